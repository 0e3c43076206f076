"""What the router and the gateway need from an encoder, local or remote: the `PrefillEncoder` protocol.

`features.encoder.Encoder` (a model in this process) and `features.remote.RemoteEncoder` (a model behind
HTTP) implement it; a vLLM-hosted encoder would too. `Router` depends on this protocol only, and refuses an
object that lacks a member (`require_encoder`), so a wrong argument fails when it is attached, not at the
first request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from prefill_router.errors import ConfigError

if TYPE_CHECKING:
    from prefill_router.features.encoder import EncoderSpec


@runtime_checkable
class PrefillEncoder(Protocol):
    """An encoder the router can route with."""

    max_tokens: int           # longer templated prompts are cut to this many tokens (keep head and tail)
    num_hidden_states: int    # embedding output + one per decoder layer
    hidden_size: int

    # Read-only (a property), so an encoder whose spec is always an EncoderSpec implements it too.
    @property
    def spec(self) -> EncoderSpec | None:
        """How to load it again (a checkpoint records it); None when a spec cannot say."""
        ...

    def identity(self) -> dict:
        """What makes its features what they are (model files, template, window); checkpoints compare it."""
        ...

    def encode(self, prompts: Sequence[Any], *, poolings: Sequence[str] = ...,
               layers: Sequence[int] | str | None = None) -> dict[str, np.ndarray]:
        """{pooling: float32 [N, len(layers), hidden]} for prompts (`data.prompt.Prompt`), in input order."""
        ...

    def count_tokens(self, prompts: Sequence[Any]) -> np.ndarray:
        """int64 [N]: each prompt's templated length in tokens, before truncation."""
        ...

    @property
    def last_token_counts(self) -> np.ndarray:
        """`count_tokens` of the prompts of this thread's latest `encode` call, without tokenizing again."""
        ...


# The protocol's members, read off the class so the two cannot drift apart.
MEMBERS = (*PrefillEncoder.__annotations__, *(name for name in vars(PrefillEncoder) if not name.startswith("_")))


def require_encoder(encoder: object) -> PrefillEncoder:
    """`encoder` when it implements PrefillEncoder; otherwise a ConfigError naming what it lacks."""
    if isinstance(encoder, PrefillEncoder):
        return encoder
    missing = [name for name in MEMBERS if not hasattr(encoder, name)]
    raise ConfigError(f"{type(encoder).__name__} is not an encoder the router can use; it lacks "
                      f"{', '.join(missing)} (see prefill_router.features.protocol.PrefillEncoder)",
                      field="encoder")
