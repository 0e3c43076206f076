"""The gateway's configuration file (YAML or TOML), validated at start with errors that name the field.

    router:
      checkpoint: runs/router            # relative paths are read from the config file's folder
      policy: null                       # null: the checkpoint's default policy
      lam: null                          # null: the checkpoint's default lambda
      max_route_tokens: null             # routing window; null: the checkpoint's, or 512 if it records none
      deadline_ms: 2000                  # routing deadline; past it the request goes to default_target
      default_target: null               # null: the strongest target (see sessions.strength)
      threads: null                      # torch CPU threads for the encoder; null: every core it may use
      prefix_cache_mb: 256                # reuse of prompt prefixes seen before (turns, system prompts); 0: off
      dtype: auto                        # encoder number format on a CPU: auto (bf16 with AMX/avx512_bf16, else
                                         # int8 with VNNI, else fp32), fp32, bf16 or int8; `quantize` is its old name
    sessions: {mode: first_turn, ttl_s: 3600, max_sessions: 100000, escalate_only: false, strength: null}
    presets:                             # `model: "router:<name>"` picks one of these per request
      best: {lam: 0}                     # policy omitted: the default policy's kind, with this lambda
      cheap: {lam: 1.0}
      safe: {policy: "tolerance:0.05"}   # any policy spec: argmax, utility:<l>, tolerance:<t>
    targets:                             # the same entries `collect` reads (prefill_router/targets.py), plus:
      - name: gpt-4o
        base_url: https://api.openai.com/v1
        model: gpt-4o-2024-08-06
        api_key_env: OPENAI_API_KEY
        usd_per_m_input: 2.5
        usd_per_m_output: 10
        timeout_s: 60
        fallbacks: [llama-70b]           # optional: who to try when this target fails (default: fallback_order)
    fallback_order: [gpt-4o, llama-70b]  # optional: default order after the chosen target (default: targets order)
    retries: 1                           # retries of the same target on timeout, connection error, 408/409/429/5xx
    request_timeout_s: 180               # all attempts of one request together (each also stops at timeout_s)
    max_retry_after_s: 5                 # honour an upstream's Retry-After up to this; longer: next target
    max_upstream_body_bytes: 16000000    # a larger plain reply counts as that target failing
    listen: {host: 127.0.0.1, port: 8000, read_timeout_s: 30, keep_alive_s: 5, max_connections: 1000}
    auth:                                # client bearer keys; none at all: the API is open
      keys: []                           # plain keys (each sees only its own traffic; no limits)
      keys_env: GATEWAY_KEYS             # comma-separated plain keys
      tenants:                           # keys with an alias, allowed targets, trade-off, limits, budgets
        - {alias: team-a, key_env: TEAM_A_KEY, models: [gpt-4o-mini, llama-70b], preset: cheap, rpm: 600,
           budget_usd_per_day: 20, budget_usd_per_month: 400}
      tenants_file: null                 # or a YAML/JSON list of such entries
    state: {redis_url: null, redis_url_env: null, prefix: "prefill-router:", timeout_ms: 250, retry_s: 1}
                                         # redis_url: pins, feedback ids, spend, limits shared by replicas
    max_body_bytes: 1000000
    batching: {max_batch_size: null,     # null: measured at start (only where a batch routes faster); or a number
               max_wait_ms: 5, length_buckets: [2000]}   # window characters: one queue and worker per bucket
    cache_size: 4096                     # routing decisions kept in the LRU cache; 0 turns it off
    feedback: {dir: null, retention_s: 604800, max_bytes: 1000000000, segment_bytes: 64000000,
               queue_size: 10000}        # dir null: POST /v1/feedback is off; see docs/serving.md
    admin: {keys: [], keys_env: null}    # bearer keys for /admin/reload; none: /admin/* answers 403
    ui: {enabled: true, recent_decisions: 200, prompt_preview_chars: 80}   # the dashboard at /ui

Micro-batching pays where one encoder forward is latency-bound (a GPU). On a CPU the prefill is compute-bound
and padding prompts of different lengths to one batch costs more than batching saves: bench/serve.py measured
0.8x the requests/s of max_batch_size 1 on a 2-core machine. So by default the gateway measures it at start
(serve/capacity.py) and batches only where that routes more prompts per second.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prefill_router.errors import ConfigError
from prefill_router.targets import TargetConfig, read_config_file, validation_message

ROUTER_ALIAS = "router"


class GatewayTarget(TargetConfig):
    fallbacks: list[str] | None = None


class RouterSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path | None = None  # required to serve; `Client` may be given a loaded Router instead
    encoder: str | None = None  # load this encoder instead of the one the checkpoint names (must match it)
    policy: str | None = None
    lam: float | None = Field(default=None, ge=0)
    # The routing window (features/window.py). null: the checkpoint's; for a checkpoint trained on whole
    # prompts, 512 tokens (serve/engine.py DEFAULT_MAX_ROUTE_TOKENS), so a long prompt costs bounded time.
    max_route_tokens: int | None = Field(default=None, gt=0)
    # Past this, a routed request goes to default_target (null: no deadline).
    deadline_ms: float | None = Field(default=2000.0, gt=0)
    default_target: str | None = None  # null: the strongest routed target (sessions.strength)
    # torch CPU threads for the encoder; null: every core this process may use. See docs/serving.md "Threads".
    threads: int | None = Field(default=None, ge=1)
    # Prefix reuse (features/prefix_cache.py): MB of cached prompt prefixes (keys, values and running sums);
    # a turn or request that starts like an earlier one computes only its new tokens. 0 turns it off.
    prefix_cache_mb: float = Field(default=256.0, ge=0)
    # The encoder's number format on a CPU (features/formats.py): auto follows the CPU (bf16 where it has AMX or
    # avx512_bf16, else int8 where it has VNNI, else fp32); fp32 serves as trained. The format is not part of the
    # encoder identity, so a float32-trained checkpoint serves in any of them (AUC against fp32: bench/formats.py).
    dtype: Literal["auto", "fp32", "bf16", "int8"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _quantize_is_the_old_dtype(cls, data: object) -> object:
        """`quantize: int8` (deprecated) is dtype int8; `quantize: null` is dtype fp32 (the encoder as trained)."""
        if not isinstance(data, dict) or "quantize" not in data:
            return data
        data = dict(data)
        quantize = data.pop("quantize")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize: {quantize!r} is not int8 or null (quantize is deprecated: use dtype)")
        dtype = "int8" if quantize == "int8" else "fp32"
        if data.get("dtype", dtype) != dtype:
            raise ValueError(f"quantize: {quantize} contradicts dtype: {data['dtype']} (quantize is the deprecated "
                             "name of dtype: give dtype only)")
        import logging  # here, so the deprecated name's whole handling sits in this one validator

        logging.getLogger(__name__).warning("router.quantize is deprecated: use router.dtype: %s", dtype)
        return {**data, "dtype": dtype}


class Sessions(BaseModel):
    """How turns of one conversation are routed; see docs/serving.md."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["per_turn", "first_turn", "sticky"] = "first_turn"
    ttl_s: float = Field(default=3600.0, gt=0)  # sticky: a pin is forgotten this long after its last use
    max_sessions: int = Field(default=100_000, ge=1)  # sticky: pins kept (least recently used go first)
    escalate_only: bool = False  # sticky: route every turn, and move the pin to a stronger target only
    strength: list[str] | None = None  # weakest -> strongest; null: by price (input + output), then config order


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str | None = None
    lam: float | None = Field(default=None, ge=0)


class Listen(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # A client must send a whole request (headers and body) within this many seconds of connecting or of its
    # previous reply; a stalled or trickling one is disconnected (slowloris).
    read_timeout_s: float = Field(default=30.0, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)  # idle keep-alive connections are closed after this
    # Connections plus requests in progress beyond which new requests get 503 (uvicorn's limit_concurrency).
    max_connections: int | None = Field(default=1000, ge=1)


class Auth(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list)
    keys_env: str | None = None

    def all_keys(self, section: str = "auth") -> set[str]:
        keys = {k for k in self.keys if k}
        if self.keys_env:
            value = os.environ.get(self.keys_env)
            if value is None:
                raise ConfigError(f"{section}.keys_env: environment variable {self.keys_env} is not set")
            keys |= {k.strip() for k in value.split(",") if k.strip()}
        return keys


class Tenant(BaseModel):
    """A client key with an alias, allowed targets, a default trade-off, a rate limit and budgets (like LiteLLM's
    virtual keys). The key itself comes from `key_env` (or `key`, for tests and examples)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    alias: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    key: str | None = Field(default=None, min_length=8)
    key_env: str | None = None
    models: list[str] | None = None  # allowed targets (routing and pinned); null: all
    preset: str | None = None        # the default trade-off of `model: "router"` for this key: a preset name ...
    lam: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # ... or a lambda
    rpm: int | None = Field(default=None, ge=1)  # requests per minute; beyond: 429 with Retry-After
    budget_usd_per_day: float | None = Field(default=None, gt=0, allow_inf_nan=False)    # UTC days
    budget_usd_per_month: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # UTC months

    @model_validator(mode="after")
    def _one_key(self) -> Tenant:
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"tenant {self.alias!r}: give exactly one of key_env (recommended) or key")
        if self.preset is not None and self.lam is not None:
            raise ValueError(f"tenant {self.alias!r}: give preset or lam, not both")
        return self

    def secret(self, where: str) -> str:
        if self.key is not None:
            return self.key
        value = os.environ.get(self.key_env or "", "").strip()
        if not value:
            raise ConfigError(f"{where}.key_env: environment variable {self.key_env} (key of tenant "
                              f"{self.alias!r}) is not set")
        return value


class ClientAuth(Auth):
    """Client keys: plain `keys` (each its own scope, no limits) and `tenants`, inline or from `tenants_file`
    (a YAML or JSON list of the same entries; relative to the config file)."""

    tenants: list[Tenant] = Field(default_factory=list)
    tenants_file: Path | None = None

    def all_tenants(self) -> list[Tenant]:
        tenants = list(self.tenants)
        if self.tenants_file is not None:
            tenants += read_tenants_file(self.tenants_file)
        aliases = [t.alias for t in tenants]
        dupes = sorted({a for a in aliases if aliases.count(a) > 1})
        if dupes:
            raise ConfigError(f"auth.tenants: duplicate alias(es) {dupes}")
        return tenants


def read_tenants_file(path: Path) -> list[Tenant]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML too
    except OSError as exc:
        raise ConfigError(f"auth.tenants_file: cannot read {path}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth.tenants_file: {path}: cannot parse: {' '.join(str(exc).split())}") from None
    if isinstance(data, dict) and "tenants" in data:
        data = data["tenants"]
    if not isinstance(data, list):
        raise ConfigError(f"auth.tenants_file: {path}: expected a list of tenants")
    try:
        return [Tenant.model_validate(entry) for entry in data]
    except ValidationError as exc:
        raise ConfigError(validation_message(f"{path} (auth.tenants_file)", exc)) from None


class State(BaseModel):
    """Where state that replicas share lives (serve/shared.py). No redis_url: in this process only."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = None       # e.g. redis://127.0.0.1:6379/0
    redis_url_env: str | None = None   # or the environment variable holding it (passwords stay out of files)
    prefix: str = Field(default="prefill-router:", min_length=1)  # key prefix: one per gateway fleet
    timeout_ms: float = Field(default=250.0, gt=0)  # each Redis call; past it, local state is used
    retry_s: float = Field(default=1.0, gt=0)       # how often an unreachable Redis is tried again

    def url(self) -> str | None:
        if self.redis_url_env:
            value = os.environ.get(self.redis_url_env)
            if not value:
                raise ConfigError(f"state.redis_url_env: environment variable {self.redis_url_env} is not set")
            return value
        return self.redis_url


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # null: measured at start (serve/capacity.py): a batch only where it routes more prompts per second than one
    # prompt at a time (on a CPU usually 1); a number: batches of up to that many.
    max_batch_size: int | None = Field(default=None, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    # Upper bounds of the window's length in characters: a prompt is batched, on its own worker thread, only
    # with prompts of its bucket, so a long prompt never holds a short one.
    length_buckets: list[int] = Field(default_factory=lambda: [2000])

    @field_validator("length_buckets")
    @classmethod
    def _ascending(cls, bounds: list[int]) -> list[int]:
        if any(b < 1 for b in bounds) or bounds != sorted(set(bounds)) or len(bounds) > 4:
            raise ValueError("must be at most 4 ascending, distinct numbers >= 1")
        return bounds


class Feedback(BaseModel):
    """Where routed requests' features and the feedback on them are kept (serve/journal.py)."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = None  # relative paths are read from the config file's folder; null: feedback off
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)  # routed features older than this are deleted
    max_bytes: int = Field(default=1_000_000_000, ge=1)  # ... and the oldest while they take more disk than this
    segment_bytes: int = Field(default=64_000_000, ge=1)  # one file of routed features is closed past this size
    # Routed requests waiting for the writer thread; beyond this their features are dropped (counted), so
    # recording never makes a request wait.
    queue_size: int = Field(default=10_000, ge=1)


class UI(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True  # serve the dashboard at /ui
    recent_decisions: int = Field(default=200, ge=0)  # decisions kept in memory for /v1/decisions
    prompt_preview_chars: int = Field(default=80, ge=0)  # of the last user message, in /v1/decisions; 0: none


def _default_presets() -> dict[str, Preset]:
    # Both keep the router's default policy kind (utility) and only set its cost weight lambda:
    # 0 ignores cost; 1 means calling the priciest target must buy a full probability point.
    return {"best": Preset(lam=0.0), "cheap": Preset(lam=1.0)}


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    router: RouterSection
    targets: list[GatewayTarget] = Field(min_length=1)
    presets: dict[str, Preset] = Field(default_factory=_default_presets)
    fallback_order: list[str] | None = None
    retries: int = Field(default=1, ge=0, le=5)
    # The whole upstream part of one request (every attempt, Retry-After wait and fallback) until the reply,
    # or a stream's first headers; each attempt also stops at its target's timeout_s.
    request_timeout_s: float | None = Field(default=180.0, gt=0)
    max_retry_after_s: float = Field(default=5.0, ge=0)  # a longer Retry-After: next target instead of waiting
    max_upstream_body_bytes: int = Field(default=16_000_000, ge=1)  # larger plain replies: that target failed
    listen: Listen = Field(default_factory=Listen)
    auth: ClientAuth = Field(default_factory=ClientAuth)
    state: State = Field(default_factory=State)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    batching: Batching = Field(default_factory=Batching)
    cache_size: int = Field(default=4096, ge=0)
    sessions: Sessions = Field(default_factory=Sessions)
    feedback: Feedback = Field(default_factory=Feedback)
    admin: Auth = Field(default_factory=Auth)
    ui: UI = Field(default_factory=UI)

    @field_validator("presets")
    @classmethod
    def _preset_names(cls, presets: dict[str, Preset]) -> dict[str, Preset]:
        for name in presets:
            if not name or ":" in name:
                raise ValueError(f"preset name {name!r} must be non-empty and contain no ':'")
        return presets

    @model_validator(mode="after")
    def _names_refer_to_targets(self) -> GatewayConfig:
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: duplicate name(s) {dupes}")
        reserved = [n for n in names if n == ROUTER_ALIAS or n.startswith(ROUTER_ALIAS + ":")]
        if reserved:
            raise ValueError(f"targets: name(s) {reserved} clash with the '{ROUTER_ALIAS}' model alias")
        known = set(names)
        if self.fallback_order is not None:
            unknown = [n for n in self.fallback_order if n not in known]
            if unknown:
                raise ValueError(f"fallback_order: unknown target(s) {unknown}; known: {names}")
        for i, t in enumerate(self.targets):
            unknown = [n for n in (t.fallbacks or []) if n not in known]
            if unknown:
                raise ValueError(f"targets.{i}.fallbacks: unknown target(s) {unknown}; known: {names}")
        if self.router.default_target is not None and self.router.default_target not in known:
            raise ValueError(f"router.default_target: unknown target {self.router.default_target!r}; known: {names}")
        unknown = [n for n in (self.sessions.strength or []) if n not in known]
        if unknown:
            raise ValueError(f"sessions.strength: unknown target(s) {unknown}; known: {names}")
        for i, tenant in enumerate(self.auth.tenants):
            self.check_tenant(tenant, f"auth.tenants.{i}")
        return self

    def check_tenant(self, tenant: Tenant, where: str) -> None:
        names = [t.name for t in self.targets]
        unknown = [n for n in (tenant.models or []) if n not in names]
        if unknown:
            raise ValueError(f"{where}.models: unknown target(s) {unknown}; known: {names}")
        if tenant.preset is not None and tenant.preset not in self.presets:
            raise ValueError(f"{where}.preset: unknown preset {tenant.preset!r}; known: {sorted(self.presets)}")

    def strength_order(self) -> list[str]:
        """Target names from weakest to strongest: sessions.strength, else by price (input + output per
        million tokens), equal prices in config order."""
        if self.sessions.strength is not None:
            return list(self.sessions.strength)
        return [t.name for t in sorted(self.targets, key=lambda t: t.usd_per_m_input + t.usd_per_m_output)]

    def unset_variables(self) -> list[str]:
        """One line per environment variable this config names that is unset: auth.keys_env, and each
        target's api_key_env (a target without its key fails every call, so its requests fall back)."""
        problems = []
        for section, auth in (("auth", self.auth), ("admin", self.admin)):
            if auth.keys_env and os.environ.get(auth.keys_env) is None:
                problems.append(f"{section}.keys_env: environment variable {auth.keys_env} is not set")
        for i, tenant in enumerate(self.auth.tenants):
            if tenant.key_env and not os.environ.get(tenant.key_env):
                problems.append(f"auth.tenants.{i}.key_env: environment variable {tenant.key_env} (key of tenant "
                                f"{tenant.alias!r}) is not set")
        if self.state.redis_url_env and not os.environ.get(self.state.redis_url_env):
            problems.append(f"state.redis_url_env: environment variable {self.state.redis_url_env} is not set")
        for i, t in enumerate(self.targets):
            if t.api_key_env and os.environ.get(t.api_key_env) is None:
                problems.append(f"targets.{i}.api_key_env: environment variable {t.api_key_env} "
                                f"(API key of target '{t.name}') is not set")
        return problems

    def fallback_chain(self, first: str) -> list[str]:
        """The targets to try, in order, when `first` is chosen: first itself, then its fallbacks."""
        by_name = {t.name: t for t in self.targets}
        rest = by_name[first].fallbacks
        if rest is None:
            rest = self.fallback_order if self.fallback_order is not None else [t.name for t in self.targets]
        chain = [first]
        for name in rest:
            if name not in chain:
                chain.append(name)
        return chain


def parse_gateway_config(data: dict, path: str | Path = "<config>") -> GatewayConfig:
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(path, exc)) from exc
    base = Path(path).parent if str(path) != "<config>" else Path.cwd()
    if config.router.checkpoint is not None and not config.router.checkpoint.is_absolute():
        config.router.checkpoint = (base / config.router.checkpoint).resolve()
    if config.feedback.dir is not None and not config.feedback.dir.is_absolute():
        config.feedback.dir = (base / config.feedback.dir).resolve()
    if config.auth.tenants_file is not None and not config.auth.tenants_file.is_absolute():
        config.auth.tenants_file = (base / config.auth.tenants_file).resolve()
    for tenant in config.auth.tenants_file and read_tenants_file(config.auth.tenants_file) or []:
        try:
            config.check_tenant(tenant, f"auth.tenants_file ({tenant.alias})")
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return config


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway config file; ConfigError names the file and each bad field."""
    return parse_gateway_config(read_config_file(path), path)
