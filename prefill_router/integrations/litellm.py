"""Prefill routing inside LiteLLM: a routing plugin that picks the target of each request.

LiteLLM keeps its keys, budgets, spend logs, retries, fallbacks and 100+ providers; this adds the decision.
One `PrefillRouting` object is both

- a LiteLLM routing plugin (`litellm.Router(plugins=[...])`, or the proxy's `router_settings.plugins`): for a
  model group whose deployments serve two or more router targets, it keeps only the deployments of the target
  the router chooses. The router is a checkpoint loaded in process (`checkpoint`) or a running gateway's
  `POST /v1/route` (`gateway_url`);
- a LiteLLM callback (`litellm.callbacks`, or the proxy's `litellm_settings.callbacks`) that puts the decision
  into the response (`response._hidden_params["prefill_router"]`; `x-prefill-router-*` headers on the proxy)
  and into the spend log (`metadata.spend_logs_metadata.prefill_router`), and that can post feedback to the
  gateway's `/v1/feedback`.

Configuration (the keys of `PrefillRoutingConfig`; on the proxy, the `prefill_router:` section of its
config.yaml, read by `prefill_router.integrations.litellm.routing`):

    checkpoint: runs/mmlu-pro/router    # a router folder (relative paths: from the config file's folder), or
    gateway_url: http://127.0.0.1:8000  # a running gateway (with gateway_key: os.environ/NAME when it needs one)
    targets:                            # router target -> the `litellm_params.model` of its deployments
      big: openai/gpt-4o
      small: openai/gpt-4o-mini
    lambda: 0.3                         # or policy: tolerance:0.02, or preset: cheap (a gateway's preset)

Per request, `metadata={"prefill_router": {"lambda": 1.0}}` (or "policy", "preset", "models": an allow-list)
overrides the trade-off. See docs/litellm.md.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefill_router.data.prompt import Message, check_prompt
from prefill_router.errors import ConfigError, PrefillRouterError, parse_config
from prefill_router.features.window import first_turn, window_messages

try:
    import httpx
    from litellm.exceptions import BadRequestError
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(f"prefill_router.integrations.litellm needs LiteLLM ({exc}); install it with "
                      "pip install 'prefill-router[litellm]'") from exc

if TYPE_CHECKING:
    from litellm.types.router import RoutingContext

    from prefill_router.router import Router

__all__ = ["SIGNAL", "PrefillRouting", "PrefillRoutingConfig", "RequestOverride", "routing"]

log = logging.getLogger("prefill_router.integrations.litellm")

SIGNAL = "prefill_router"  # the key of the decision: in routing signals, metadata, spend logs and _hidden_params
# LiteLLM keeps a routing plugin's narrowed candidates in the request metadata under this key, and (in 1.110)
# still applies them after a fallback to another model group, which then finds no deployment; see `run`.
_NARROWED = "_routing_plugin_candidate_models"
Scorer = Callable[[dict, Any], "float | None | Awaitable[float | None]"]


class PrefillRoutingConfig(BaseModel):
    """What the plugin is configured with; errors name the field."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    checkpoint: str | None = None
    gateway_url: str | None = None
    gateway_key: str | None = None  # a key, or "os.environ/NAME" (LiteLLM's way of naming a secret)
    targets: dict[str, str] = Field(min_length=2)
    lam: float | None = Field(default=None, alias="lambda", ge=0, allow_inf_nan=False)
    policy: str | None = None
    preset: str | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    default_target: str | None = None  # where a request goes when routing fails (else: LiteLLM's own pick)
    scorer: str | None = None  # "module.function" (kwargs, response) -> score in [0, 1] or None: feedback

    @model_validator(mode="after")
    def _check(self) -> PrefillRoutingConfig:
        if (self.checkpoint is None) == (self.gateway_url is None):
            raise ValueError("give exactly one of 'checkpoint' (a router folder) and 'gateway_url'")
        if self.preset is not None and self.checkpoint is not None:
            raise ValueError("'preset' names a gateway preset; with a checkpoint give 'lambda' or 'policy'")
        if self.default_target is not None and self.default_target not in self.targets:
            raise ValueError(f"default_target '{self.default_target}' is not one of targets: {', '.join(self.targets)}")
        return self


class RequestOverride(BaseModel):
    """The request's own `metadata.prefill_router` object: the trade-off and an allow-list for this request."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lam: float | None = Field(default=None, alias="lambda", ge=0, allow_inf_nan=False)
    policy: str | None = None
    preset: str | None = None
    models: list[str] | None = Field(default=None, min_length=1)


class PrefillRouting(CustomLogger):
    """A LiteLLM routing plugin and callback that routes with a prefill-router checkpoint or gateway."""

    def __init__(self, *, targets: Mapping[str, str], checkpoint: str | os.PathLike[str] | None = None,
                 gateway_url: str | None = None, gateway_key: str | None = None, lam: float | None = None,
                 policy: str | None = None, preset: str | None = None, timeout_s: float = 10.0,
                 default_target: str | None = None, scorer: Scorer | str | None = None):
        super().__init__()
        self.config = parse_config(PrefillRoutingConfig, {
            "targets": dict(targets), "checkpoint": None if checkpoint is None else str(checkpoint),
            "gateway_url": gateway_url, "gateway_key": gateway_key, "lambda": lam, "policy": policy,
            "preset": preset, "timeout_s": timeout_s, "default_target": default_target,
            "scorer": scorer if isinstance(scorer, str) else None}, "prefill_router (LiteLLM plugin) config")
        self.scorer: Scorer | None = load_callable(scorer, "scorer") if isinstance(scorer, str) else scorer
        self._by_model: dict[str, str] = {}  # litellm model -> router target
        for target, model in self.config.targets.items():
            if model in self._by_model:
                raise ConfigError(f"'{model}' is mapped to both '{self._by_model[model]}' and '{target}'",
                                  field="targets")
            self._by_model[model] = target
        if self.config.gateway_url is not None:
            gateway_options(self.config.policy, self.config.lam)  # fail now on a policy a gateway cannot take
        self.router: Router | None = None
        self._lock = threading.Lock()  # one encoder forward at a time
        if self.config.checkpoint is not None:
            self.router = self._load_router(self.config.checkpoint)
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_config(cls, section: Any, base: str | os.PathLike[str] | None = None) -> PrefillRouting:
        """From a config mapping (the `prefill_router:` section); a relative checkpoint is read from `base`."""
        if not isinstance(section, Mapping):
            raise ConfigError("the prefill_router section must be a mapping with 'targets' and 'checkpoint' or "
                              f"'gateway_url', got {type(section).__name__}")
        config = parse_config(PrefillRoutingConfig, dict(section), "prefill_router (LiteLLM plugin) config")
        checkpoint = config.checkpoint
        if checkpoint is not None and base is not None and not Path(checkpoint).is_absolute():
            checkpoint = str(Path(base) / checkpoint)
        return cls(targets=config.targets, checkpoint=checkpoint, gateway_url=config.gateway_url,
                   gateway_key=config.gateway_key, lam=config.lam, policy=config.policy, preset=config.preset,
                   timeout_s=config.timeout_s, default_target=config.default_target, scorer=config.scorer)

    @classmethod
    def from_litellm_config(cls, path: str | os.PathLike[str] | None = None) -> PrefillRouting:
        """From the `prefill_router:` section of a LiteLLM config.yaml: `path`, else the file the LiteLLM proxy
        was started with (its --config, or $CONFIG_FILE_PATH)."""
        import yaml

        if path is None:
            proxy = sys.modules.get("litellm.proxy.proxy_server")
            path = getattr(proxy, "user_config_file_path", None) or os.environ.get("CONFIG_FILE_PATH")
        if not path:
            raise ConfigError("no LiteLLM config file to read the prefill_router section from: start the proxy with "
                              "--config, or pass the path")
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"LiteLLM config file {file} does not exist")
        config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        if not isinstance(config, dict) or SIGNAL not in config:
            raise ConfigError(f"{file} has no top-level 'prefill_router:' section (checkpoint or gateway_url, "
                              "targets, lambda); see docs/litellm.md")
        return cls.from_config(config[SIGNAL], base=file.parent)

    # -- the router ------------------------------------------------------------------------------------------
    def _load_router(self, checkpoint: str) -> Router:
        from prefill_router.router import Router

        router = Router.load(checkpoint)
        unknown = [t for t in self.config.targets if t not in router.targets]
        if unknown:
            raise ConfigError(f"{unknown} are not targets of the router in {checkpoint} "
                              f"({', '.join(router.targets)})", field="targets")
        router.resolve_policy(*self._policy(self.config.policy, self.config.lam))  # fail now on a bad policy
        return router

    @staticmethod
    def _policy(policy: str | None, lam: float | None) -> tuple[str | None, float | None]:
        """(policy, lam) as `Router.choose` takes them: a lambda alone keeps the utility policy's kind."""
        if lam is not None and policy is None:
            return "utility:0", lam
        return policy, lam

    def _route_local(self, messages: list[Message], allowed: list[str], policy: str | None,
                     lam: float | None) -> dict:
        router = self.router
        assert router is not None
        with self._lock:
            P, C, truncated = router.predict_batch([window_messages(first_turn(messages))])
        cols = [router.targets.index(t) for t in allowed]
        policy, lam = self._policy(policy, lam)
        k = int(router.choose(P[:, cols], C[:, cols], policy=policy, lam=lam)[0])
        return {"target": allowed[k], "probabilities": {t: float(P[0, i]) for i, t in enumerate(router.targets)},
                "estimated_cost": {t: float(C[0, i]) for i, t in enumerate(router.targets)},
                "policy": router.describe_policy(policy, lam), "lambda": lam, "truncated": bool(truncated[0]),
                "request_id": f"pr-{uuid.uuid4().hex}", "source": "checkpoint"}

    async def _route_gateway(self, messages: list[Message], allowed: list[str], policy: str | None,
                             lam: float | None, preset: str | None) -> dict:
        options = {"models": allowed, **gateway_options(policy, lam)}
        body = {"model": f"router:{preset}" if preset else "router", "messages": messages, "router": options}
        reply = await self._http().post(f"{self.config.gateway_url}/v1/route", json=body,
                                        headers=self._auth())
        if reply.status_code != 200:
            raise PrefillRouterError(f"gateway /v1/route answered {reply.status_code}: {reply.text[:300]}")
        decided = reply.json()
        if decided.get("target") not in allowed:
            raise PrefillRouterError(f"gateway /v1/route chose {decided.get('target')!r}, not one of {allowed}")
        return {"target": decided["target"], "probabilities": decided.get("probabilities"),
                "estimated_cost": decided.get("estimated_cost"), "policy": decided.get("policy"),
                "lambda": options.get("lambda"), "truncated": decided.get("truncated"),
                "request_id": decided.get("request_id"), "source": "gateway"}

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.config.timeout_s)
        return self._client

    def _auth(self) -> dict[str, str]:
        key = self.config.gateway_key
        if key and key.startswith("os.environ/"):
            name = key.removeprefix("os.environ/")
            key = os.environ.get(name)
            if not key:
                raise ConfigError(f"environment variable {name} is not set", field="gateway_key")
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def decide(self, messages: Any, allowed: list[str], override: RequestOverride | None = None) -> dict:
        """The decision for chat `messages` among the `allowed` targets: {"target", "probabilities", "policy",
        "lambda", "request_id", ...}."""
        override = override or RequestOverride()
        prompt = check_prompt(messages)
        normal: list[Message] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        normal = [m for m in normal if m["content"]]
        per_request = override.lam is not None or override.policy is not None or override.preset is not None
        lam, policy = (override.lam, override.policy) if per_request else (self.config.lam, self.config.policy)
        preset = override.preset if per_request else self.config.preset
        if override.models is not None:
            allowed = [t for t in allowed if t in override.models]
            if not allowed:
                raise ConfigError(f"none of {override.models} is served by this model group", field="models")
        start = time.perf_counter()
        if self.router is not None:
            if preset is not None:
                raise ConfigError("'preset' names a gateway preset; this plugin routes with a checkpoint",
                                  field="preset")
            decision = await asyncio.to_thread(self._route_local, normal, allowed, policy, lam)
        else:
            decision = await self._route_gateway(normal, allowed, policy, lam, preset)
        return {**decision, "latency_ms": round((time.perf_counter() - start) * 1e3, 3)}

    # -- the routing plugin ----------------------------------------------------------------------------------
    async def run(self, context: RoutingContext) -> RoutingContext:
        """LiteLLM's routing-plugin hook: narrow the candidates to the chosen target's deployments."""
        try:  # a bad override fails the request in every group it reaches, a fallback's included
            override = request_override(context.metadata)
        except ConfigError as exc:
            raise BadRequestError(str(exc), model=context.metadata.get("model_group"), llm_provider=SIGNAL) from None
        by_target: dict[str, list[str]] = {}
        for model in context.candidate_models:
            if model in self._by_model:
                by_target.setdefault(self._by_model[model], []).append(model)
        narrowed = context.metadata.get(_NARROWED)
        if isinstance(narrowed, list) and not set(narrowed) & set(context.candidate_models):
            narrowed[:] = context.candidate_models  # a fallback group: the narrowing was for the group before
        if len(by_target) < 2:  # nothing to choose (a target's own group, a fallback): keep any decision made
            earlier = decision_of(context.metadata)
            if earlier is not None:
                context.signals[SIGNAL] = earlier
            return context
        try:
            decision = await self.decide(context.structured_messages, list(by_target), override)
        except ConfigError as exc:  # the request asks for what this plugin cannot do (a preset, an empty allow-list)
            raise BadRequestError(str(exc), model=context.metadata.get("model_group"), llm_provider=SIGNAL) from None
        except (PrefillRouterError, httpx.HTTPError, ValueError) as exc:
            log.warning("prefill routing failed (%s); %s", exc, f"sending to {self.config.default_target}"
                        if self.config.default_target in by_target else "LiteLLM picks among the candidates")
            if self.config.default_target not in by_target:
                context.signals[SIGNAL] = {"target": None, "error": str(exc)}
                return context
            decision = {"target": self.config.default_target, "policy": "default", "error": str(exc),
                        "request_id": None, "source": "default"}
        context.candidate_models = by_target[decision["target"]]
        context.signals[SIGNAL] = decision
        return context

    # -- the callback ----------------------------------------------------------------------------------------
    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict | None:
        """After the pick, before the call: the decision goes into the spend log's metadata."""
        metadata = request_metadata(kwargs)
        decision = decision_of(metadata)
        if metadata is not None and decision is not None:
            spend = metadata.get("spend_logs_metadata")
            metadata["spend_logs_metadata"] = {**(spend if isinstance(spend, dict) else {}), SIGNAL: decision}
        return kwargs

    async def async_post_call_success_deployment_hook(self, request_data: dict, response: Any,
                                                      call_type: Any) -> Any:
        """The decision in the response: `response._hidden_params["prefill_router"]`."""
        decision = decision_of(request_metadata(request_data))
        hidden = getattr(response, "_hidden_params", None)
        if decision is not None and isinstance(hidden, dict):
            hidden[SIGNAL] = decision
        return response

    async def async_post_call_response_headers_hook(self, data: dict, user_api_key_dict: Any, response: Any,
                                                    request_headers: dict[str, str] | None = None,
                                                    litellm_call_info: dict[str, object] | None = None
                                                    ) -> dict[str, str] | None:
        """The proxy's response headers (streams included): x-prefill-router-target, -request-id, -policy,
        -probabilities."""
        decision = decision_of(request_metadata(data))
        if decision is None or decision.get("target") is None:
            return None
        headers = {"x-prefill-router-target": str(decision["target"])}
        if decision.get("request_id"):
            headers["x-prefill-router-request-id"] = str(decision["request_id"])
        if decision.get("policy"):
            headers["x-prefill-router-policy"] = str(decision["policy"])
        if decision.get("probabilities"):
            headers["x-prefill-router-probabilities"] = json.dumps(
                {t: round(p, 6) for t, p in decision["probabilities"].items()}, separators=(",", ":"))
        return headers

    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        """With a `scorer`, its score for this answer goes to the gateway's /v1/feedback."""
        if self.scorer is None:
            return
        decision = decision_of(request_metadata(kwargs))
        if decision is None or not decision.get("request_id"):
            return
        try:
            score = self.scorer(kwargs, response_obj)
            if inspect.isawaitable(score):
                score = await score
            if score is not None:
                await self.send_feedback(decision["request_id"], float(score), answered_model(kwargs, response_obj))
        except Exception as exc:  # noqa: BLE001 - feedback must never fail the request it scores
            log.warning("prefill-router feedback not sent: %s", exc)

    async def send_feedback(self, request_id: str, score: float, model: str | None = None) -> dict:
        """POST {"id", "score", "target"} to the gateway's /v1/feedback; `model` is the LiteLLM model that
        answered (its target is scored). Returns what the gateway recorded."""
        if self.config.gateway_url is None:
            raise ConfigError("feedback goes to a gateway's /v1/feedback: configure gateway_url", field="gateway_url")
        body: dict[str, Any] = {"id": request_id, "score": score}
        if model is not None and model in self._by_model:
            body["target"] = self._by_model[model]
        reply = await self._http().post(f"{self.config.gateway_url}/v1/feedback", json=body, headers=self._auth())
        if reply.status_code != 200:
            raise PrefillRouterError(f"gateway /v1/feedback answered {reply.status_code}: {reply.text[:300]}")
        recorded: dict = reply.json()
        return recorded


def gateway_options(policy: str | None, lam: float | None) -> dict[str, float]:
    """The gateway request's `router` trade-off for a policy spec and lambda: {"lambda": x} or {"tolerance": x}."""
    if policy is None:
        return {} if lam is None else {"lambda": float(lam)}
    name, _, value = (part.strip() for part in policy.partition(":"))
    try:
        if name == "tolerance" and lam is None:
            return {"tolerance": float(value)}
        if name in ("utility", "argmax"):
            return {"lambda": float(lam if lam is not None else value if name == "utility" else 0.0)}
    except ValueError:
        pass
    raise ConfigError(f"'{policy}' with lambda {lam}: a gateway takes argmax, utility:<lambda>, tolerance:<points> "
                      "or a lambda", field="policy")


# --- reading LiteLLM's request -------------------------------------------------------------------------------
def request_metadata(kwargs: Mapping[str, Any] | None) -> dict | None:
    """The request's metadata dict: kwargs["metadata"], kwargs["litellm_metadata"] or the logging kwargs'
    litellm_params.metadata."""
    if not isinstance(kwargs, Mapping):
        return None
    for holder in (kwargs, kwargs.get("litellm_params")):
        for key in ("metadata", "litellm_metadata"):
            metadata = holder.get(key) if isinstance(holder, Mapping) else None
            if isinstance(metadata, dict) and decision_of(metadata) is not None:
                return metadata
    return None


def decision_of(metadata: Mapping[str, Any] | None) -> dict | None:
    """The routing decision recorded in a request's metadata (None when the plugin made none)."""
    for key in ("routing_plugin_signals", "spend_logs_metadata"):
        holder = metadata.get(key) if metadata is not None else None
        decision = holder.get(SIGNAL) if isinstance(holder, Mapping) else None
        if isinstance(decision, dict):
            return decision
    return None


def request_override(metadata: Mapping[str, Any]) -> RequestOverride | None:
    """The request's `metadata.prefill_router` object, validated; a ConfigError names the bad field."""
    value = metadata.get(SIGNAL)
    if value is None:
        return None
    return parse_config(RequestOverride, value, "metadata.prefill_router")


def answered_model(kwargs: Mapping[str, Any], response: Any) -> str | None:
    """The `litellm_params.model` of the deployment that answered."""
    hidden = getattr(response, "_hidden_params", None)
    if isinstance(hidden, dict) and isinstance(hidden.get("litellm_model_name"), str):
        return str(hidden["litellm_model_name"])
    standard = kwargs.get("standard_logging_object")
    if isinstance(standard, Mapping):
        info = standard.get("hidden_params") or {}
        if isinstance(info, Mapping) and isinstance(info.get("litellm_model_name"), str):
            return str(info["litellm_model_name"])
    return None


def load_callable(path: str, field: str) -> Scorer:
    """A function named "package.module.function"."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load '{path}': {exc}", field=field) from None
    if not callable(function):
        raise ConfigError(f"'{path}' is not a function 'module.function'", field=field)
    return function


# --- the proxy's entry point: `router_settings.plugins` / `litellm_settings.callbacks` name it ---------------
_configured: PrefillRouting | None = None


def __getattr__(name: str) -> Any:
    """`routing`: the plugin configured from the LiteLLM proxy's config.yaml (one object for both lists)."""
    global _configured
    if name == "routing":
        if _configured is None:
            _configured = PrefillRouting.from_litellm_config()
        return _configured
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    routing: PrefillRouting
