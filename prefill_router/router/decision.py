"""What a routing call returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RouteDecision:
    target: str                       # the chosen target's name
    probabilities: dict[str, float]   # P(correct) per target
    estimated_cost: dict[str, float]  # USD per target for this prompt
    latency_ms: float = 0.0           # encoder prefill + transform + MLP + policy
    truncated: bool = False           # the prompt was longer than the encoder context and was cut

    def to_dict(self) -> dict:
        return asdict(self)
