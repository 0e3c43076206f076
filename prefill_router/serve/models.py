"""What the `model` field of a request asks for. Shared by the gateway and `Client`.

    "router"          route with the default policy and lambda
    "router:<number>" route with the default policy at lambda = number (the cost weight; 0 ignores cost)
    "router:<preset>" route with a named preset's policy and lambda (e.g. router:cheap, router:best)
    "<target name>"   skip routing and send to that target (retried, but never replaced by a fallback)

and what the optional `router` object of a request body asks for (`RouterOptions`; the OpenAI SDK sends it
with `extra_body={"router": {...}}`). The gateway reads it and never forwards it upstream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from prefill_router.errors import PrefillRouterError
from prefill_router.serve.config import ROUTER_ALIAS, Preset


class UnknownModel(PrefillRouterError, ValueError):
    """The request's `model` is missing, not a string, or names no router alias, preset or target; `code` is the
    OpenAI-style error code the gateway answers with."""

    def __init__(self, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ModelChoice:
    requested: str
    pinned: str | None = None   # a target name: no routing
    policy: str | None = None   # None: the router's default
    lam: float | None = None    # None: the router's default


def resolve_model(name: object, targets: Sequence[str], presets: Mapping[str, Preset], *,
                  default_policy: str | None = None, default_lam: float | None = None) -> ModelChoice:
    if name is None or name == "":
        raise UnknownModel("'model' is required: 'router', 'router:<lambda>', 'router:<preset>' or a target name",
                           code="missing_required_parameter")
    if not isinstance(name, str):
        raise UnknownModel(f"'model' must be a string such as 'router' or a target name, got {name!r} "
                           f"({type(name).__name__})")
    if name in targets:
        return ModelChoice(name, pinned=name)
    if name == ROUTER_ALIAS:
        return ModelChoice(name, policy=default_policy, lam=default_lam)
    if name.startswith(ROUTER_ALIAS + ":"):
        suffix = name[len(ROUTER_ALIAS) + 1:]
        if suffix in presets:
            return ModelChoice(name, *preset_policy(presets[suffix], default_policy, default_lam))
        try:
            lam = float(suffix)
        except ValueError:
            raise UnknownModel(f"model '{name}': '{suffix}' is neither a number nor a preset "
                               f"({', '.join(sorted(presets)) or 'none configured'})", code="model_not_found") from None
        if not math.isfinite(lam) or lam < 0:
            raise UnknownModel(f"model '{name}': lambda must be a finite number >= 0")
        return ModelChoice(name, policy=default_policy, lam=lam)
    raise UnknownModel(f"unknown model '{name}'; use 'router', 'router:<lambda>', "
                       + "".join(f"'router:{p}', " for p in sorted(presets))
                       + f"or a target: {', '.join(targets)}", code="model_not_found")


def preset_policy(preset: Preset, default_policy: str | None, default_lam: float | None
                  ) -> tuple[None, str | None, float | None]:
    """(pinned=None, policy, lam) of a preset. A preset naming its policy is taken as written; one giving only
    lambda keeps the default policy's kind with that lambda."""
    if preset.policy is not None:
        return None, preset.policy, preset.lam
    return None, default_policy, preset.lam if preset.lam is not None else default_lam


def model_ids(targets: Sequence[str], presets: Mapping[str, Preset]) -> list[str]:
    return [ROUTER_ALIAS] + [f"{ROUTER_ALIAS}:{p}" for p in presets] + list(targets)


class BadRouterOptions(PrefillRouterError, ValueError):
    """The request's `router` object is invalid; the message names the field (`router.<field>: ...`)."""


class RouterOptions(BaseModel):
    """The optional `router` object of a chat request:

        models           allow-list: the router chooses among these targets only
        lambda           cost weight for this request (the default policy's kind), like model "router:<lambda>"
        tolerance        instead: the cheapest target within this much P of the best one
        session          a session id: this request's conversation is pinned to its first decision (sticky)
        return_decision  add the decision to the reply body as "router_decision" (non-streaming replies)
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    models: list[StrictStr] | None = Field(default=None, min_length=1, max_length=64)
    lam: StrictFloat | StrictInt | None = Field(default=None, alias="lambda", ge=0, allow_inf_nan=False)
    tolerance: StrictFloat | StrictInt | None = Field(default=None, ge=0, allow_inf_nan=False)
    session: StrictStr | None = Field(default=None, min_length=1, max_length=256)
    return_decision: StrictBool = False


def parse_router_options(value: Any, routed_targets: Sequence[str]) -> RouterOptions:
    """RouterOptions from a request body's `router` value (None: defaults); BadRouterOptions names the field."""
    if value is None:
        return RouterOptions()
    if not isinstance(value, dict):
        raise BadRouterOptions(f"router: must be an object, got {type(value).__name__}")
    try:
        options = RouterOptions.model_validate(value)
    except ValidationError as exc:
        problems: dict[str, str] = {}  # the first problem per field (a number field reports float and int)
        for e in exc.errors():
            problems.setdefault(f"router.{e['loc'][0]}" if e["loc"] else "router", e["msg"])
        raise BadRouterOptions("; ".join(f"{field}: {msg}" for field, msg in problems.items())) from None
    if options.lam is not None and options.tolerance is not None:
        raise BadRouterOptions("router.lambda, router.tolerance: give one or the other, not both")
    unknown = [m for m in options.models or [] if m not in routed_targets]
    if unknown:
        raise BadRouterOptions(f"router.models: {unknown} are not targets this router chooses among "
                               f"({', '.join(routed_targets)})")
    return options


def apply_options(choice: ModelChoice, options: RouterOptions) -> ModelChoice:
    """The model choice with the request's own trade-off; refuses routing options for a pinned target."""
    if choice.pinned is not None:
        given = [name for name, v in (("models", options.models), ("lambda", options.lam),
                                      ("tolerance", options.tolerance), ("session", options.session)) if v is not None]
        if given:
            raise BadRouterOptions(f"router.{given[0]}: applies to routed requests ('router', 'router:<lambda>', "
                                   f"'router:<preset>'), not to the target '{choice.pinned}' asked for by name")
        return choice
    if options.tolerance is not None:
        return replace(choice, policy=f"tolerance:{float(options.tolerance):g}", lam=None)
    if options.lam is not None:
        return replace(choice, lam=float(options.lam))
    return choice
