"""What the `model` field of a request asks for. Shared by the gateway and `Client`.

    "router"          route with the default policy and lambda
    "router:<number>" route with the default policy at lambda = number (the cost weight; 0 ignores cost)
    "router:<preset>" route with a named preset's policy and lambda (e.g. router:cheap, router:best)
    "<target name>"   skip routing and send to that target (retried, but never replaced by a fallback)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prefill_router.serve.config import ROUTER_ALIAS, Preset


class UnknownModel(ValueError):
    pass


@dataclass(frozen=True)
class ModelChoice:
    requested: str
    pinned: str | None = None   # a target name: no routing
    policy: str | None = None   # None: the router's default
    lam: float | None = None    # None: the router's default


def resolve_model(name: object, targets: Sequence[str], presets: Mapping[str, Preset], *,
                  default_policy: str | None = None, default_lam: float | None = None) -> ModelChoice:
    if not isinstance(name, str) or not name:
        raise UnknownModel("'model' is required: 'router', 'router:<lambda>', 'router:<preset>' or a target name")
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
                               f"({', '.join(sorted(presets)) or 'none configured'})") from None
        if not math.isfinite(lam) or lam < 0:
            raise UnknownModel(f"model '{name}': lambda must be a finite number >= 0")
        return ModelChoice(name, policy=default_policy, lam=lam)
    raise UnknownModel(f"unknown model '{name}'; use 'router', 'router:<lambda>', "
                       + "".join(f"'router:{p}', " for p in sorted(presets))
                       + f"or a target: {', '.join(targets)}")


def preset_policy(preset: Preset, default_policy: str | None, default_lam: float | None
                  ) -> tuple[None, str | None, float | None]:
    """(pinned=None, policy, lam) of a preset. A preset naming its policy is taken as written; one giving only
    lambda keeps the default policy's kind with that lambda."""
    if preset.policy is not None:
        return None, preset.policy, preset.lam
    return None, default_policy, preset.lam if preset.lam is not None else default_lam


def model_ids(targets: Sequence[str], presets: Mapping[str, Preset]) -> list[str]:
    return [ROUTER_ALIAS] + [f"{ROUTER_ALIAS}:{p}" for p in presets] + list(targets)
