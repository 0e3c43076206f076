"""The trained router at run time: encoder prefill -> pooled hidden states -> transform -> SharedTrunkNet
ensemble -> policy, for one prompt or a batch (one encoder forward per batch).

The encoder is anything that implements `features.protocol.PrefillEncoder`; a router refuses an encoder whose
identity differs from the one its features came from. Training is `router/train.py`, the checkpoint folder
`router/persistence.py` (`Router.save` / `Router.load` call it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from prefill_router.errors import CheckpointError, ConfigError, EncoderError
from prefill_router.features.protocol import PrefillEncoder, require_encoder
from prefill_router.features.surprise import SURPRISE
from prefill_router.router.decision import RouteDecision
from prefill_router.router.fallback import FallbackScorer
from prefill_router.router.policy import UtilityPolicy, policy_from_spec
from prefill_router.router.transform import FeatureTransform, SourceTransform
from prefill_router.router.trunk import TrunkEnsemble

if TYPE_CHECKING:
    from prefill_router.data.prices import CostModel
    from prefill_router.data.prompt import Message, Prompt
    from prefill_router.features.embedding_mean import EmbeddingMean
    from prefill_router.features.encoder import EncoderSpec
    from prefill_router.router.base import Policy

# Which of a router's scorers a policy belongs to: the prefill router, or its fast fallback scorer.
Scorer = Literal["prefill", "fallback"]
SCORERS = ("prefill", "fallback")


# ---------------------------------------------------------------------------------------------------------
# encoders: the features stage owns them; the router reads them through the PrefillEncoder protocol
# ---------------------------------------------------------------------------------------------------------
def encoder_identity(encoder: PrefillEncoder | EncoderSpec | dict) -> dict:
    """The JSON-safe identity of an encoder, of an EncoderSpec, or a dict that already is one."""
    if isinstance(encoder, dict):
        return encoder
    from prefill_router.features.encoder import EncoderSpec

    if isinstance(encoder, EncoderSpec):
        return encoder.identity()
    return require_encoder(encoder).identity()


def encoder_spec_dict(encoder: PrefillEncoder | EncoderSpec | dict) -> dict | None:
    """The spec that loads `encoder` again, as JSON; None when none does (an identity dict, a remote encoder)."""
    if isinstance(encoder, dict):
        return None
    spec = encoder if not isinstance(encoder, PrefillEncoder) else encoder.spec
    return None if spec is None else spec.model_dump(mode="json")


def spec_from_identity(identity: dict | None) -> dict | None:
    """An encoder spec that loads the encoder an identity describes (the identity check then confirms the
    files are the same), or None when the identity does not name a model."""
    if not isinstance(identity, dict) or not identity.get("model"):
        return None
    spec = {"model": identity["model"]}
    for key in ("template", "max_tokens", "max_route_tokens", "revision"):
        if identity.get(key) is not None:
            spec[key] = identity[key]
    return spec


# A source that is not the encoder's: the MiniLM sentence embedding of the prompt (features/semantic.py).
MINILM = "minilm"


def check_sources(sources: Sequence[dict]) -> list[dict]:
    """Feature sources as the router records them: {"pooling": "mean"|"last", "hidden_states": [...]},
    {"pooling": "surprise"} or {"pooling": "minilm", "model": <its files' hash>}; the first is the encoder's. A
    source of a second encoder also holds "encoder": {"identity": ..., "spec": ...}, the encoder that computes it
    (loaded at the first routing call and checked against the identity, as the main one is)."""
    out = []
    for source in sources:
        pooling = source.get("pooling") if isinstance(source, dict) else None
        if not isinstance(pooling, str):
            raise ConfigError(f"feature source {source!r} names no pooling")
        states = source.get("hidden_states")
        out.append({**source, "hidden_states": None if states is None else [int(h) for h in states]})
    for source in out:
        other = source.get("encoder")
        if other is not None and not (isinstance(other, dict) and isinstance(other.get("identity"), dict)):
            raise ConfigError(f"feature source {source['pooling']!r}: its encoder record has no identity")
    if not out or out[0]["pooling"] in (SURPRISE, MINILM) or out[0].get("encoder") is not None:
        raise ConfigError("the first feature source must be the encoder's hidden states (mean or last pooling)")
    return out


def _same_identity(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_identity(encoder: PrefillEncoder, trained: dict, where: str = "") -> None:
    """Refuse `encoder` when its identity differs from the one the features were trained on, naming both."""
    given = encoder_identity(encoder)
    if not _same_identity(given, trained):
        raise CheckpointError(
            f"encoder mismatch{where}: the router was trained on features of encoder "
            f"{json.dumps(trained, sort_keys=True, default=str)} but the encoder given is "
            f"{json.dumps(given, sort_keys=True, default=str)}")


class Router:
    """Encoder prefill -> pooled hidden states -> transform -> SharedTrunkNet ensemble -> policy.

    Use `Router.load(folder)` for a saved router, `train_router(...)` (router/train.py) to build one.
    """

    def __init__(self, *, targets: Sequence[str], transform: FeatureTransform | SourceTransform,
                 predictor: TrunkEnsemble, pooling: str, hidden_states: Sequence[int] | None,
                 encoder_identity: dict | None,
                 encoder_spec: dict | None = None, cost_model: CostModel | None = None, policy: str = "argmax",
                 metrics: dict | None = None, training: dict | None = None, encoder: PrefillEncoder | None = None,
                 sources: Sequence[dict] | None = None, fallback: FallbackScorer | None = None):
        self._targets = list(targets)
        self.transform = transform
        self.predictor = predictor
        self.pooling = pooling
        self.hidden_states = None if hidden_states is None else [int(h) for h in hidden_states]
        # Several sources (the main states, the surprise statistics, the MiniLM embedding...) go through a
        # SourceTransform, one part each; one source keeps the plain transform.
        self.sources = check_sources(sources or [{"pooling": pooling, "hidden_states": self.hidden_states}])
        parts = len(transform.widths) if isinstance(transform, SourceTransform) else 1
        if parts != len(self.sources):
            raise ConfigError(f"the transform has {parts} source part(s) for {len(self.sources)} feature source(s)")
        self.encoder_identity = encoder_identity
        self.encoder_spec = encoder_spec
        self.cost_model = cost_model
        self.default_policy = policy
        self.metrics = metrics or {}
        self.training = training or {}
        self.encoder: PrefillEncoder | None = None
        if predictor.n_targets is not None and predictor.n_targets != len(self._targets):
            raise ConfigError(f"predictor has {predictor.n_targets} outputs for {len(self._targets)} targets")
        if cost_model is not None and list(cost_model.targets) != self._targets:
            raise ConfigError(f"cost model targets {cost_model.targets} differ from router targets {self._targets}")
        # The fast fallback scorer (router/fallback.py), or None for a checkpoint trained without one.
        self.fallback = fallback
        if fallback is not None and fallback.n_targets != len(self._targets):
            raise ConfigError(f"the fallback scorer has {fallback.n_targets} outputs for {len(self._targets)} targets")
        self.resolve_policy()  # fail now on a bad default, not at the first request
        if encoder is not None:
            self.attach_encoder(encoder)

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    # -- encoder -----------------------------------------------------------------------------------------
    def attach_encoder(self, encoder: PrefillEncoder) -> None:
        """Use `encoder` for routing; refuses an object that is not a PrefillEncoder, and an encoder whose
        identity differs from the training one."""
        encoder = require_encoder(encoder)
        if self.encoder_identity is not None:
            check_identity(encoder, self.encoder_identity)
        self.encoder = encoder

    def _require_encoder(self) -> PrefillEncoder:
        if self.encoder is None:
            if self.encoder_spec is None:
                raise CheckpointError("this router has no encoder attached and its checkpoint names no encoder "
                                      "spec to load; pass encoder= to Router.load")
            from prefill_router.features import load_encoder

            self.attach_encoder(load_encoder(_spec_from_dict(self.encoder_spec)))
        assert self.encoder is not None
        return self.encoder

    # -- prediction --------------------------------------------------------------------------------------
    def predict_proba_features(self, X: np.ndarray) -> np.ndarray:
        """P[N, K] from pooled features [N, hidden_states, H] (exactly the router's hidden states) or the
        same flattened to [N, D]."""
        return self.predictor.predict_proba(self.transform.transform(X))

    def _main_sources(self) -> list[dict]:
        return [s for s in self.sources if s["pooling"] != MINILM and s.get("encoder") is None]

    def feature_request(self) -> tuple[list[str], list[int] | None]:
        """(poolings, hidden states) of the one call of the router's encoder that computes its sources."""
        main = self._main_sources()
        poolings = list(dict.fromkeys(s["pooling"] for s in main))
        if len(self.sources) == 1:
            return poolings, self.hidden_states
        states = sorted({h for s in main if s["pooling"] != SURPRISE for h in s["hidden_states"] or []})
        return poolings, states or None

    @property
    def layers_run(self) -> int | None:
        """Encoder layers one routing call runs: the deepest state read, or None for all of them (every state,
        or the surprise statistics, which read the final one)."""
        poolings, states = self.feature_request()
        return None if SURPRISE in poolings or not states else max(states)

    def features_of(self, encoder: PrefillEncoder, prompts: list) -> np.ndarray:
        """The router's input for `prompts` from one call of `encoder`: [N, L, H] for one source, the sources'
        features flattened and side by side [N, D] for several."""
        poolings, states = self.feature_request()
        out = encoder.encode(prompts, poolings=poolings, layers=states)
        if len(self.sources) == 1:
            return np.asarray(out[self.pooling])
        blocks = []
        for i, source in enumerate(self.sources):
            pooling = source["pooling"]
            if pooling == MINILM:
                blocks.append(self._embed(prompts, source))
            elif source.get("encoder") is not None:  # a second encoder: one call of its own
                other = self._source_encoder(i, source).encode(prompts, poolings=[pooling],
                                                                 layers=source["hidden_states"])
                blocks.append(np.asarray(other[pooling]).reshape(len(prompts), -1))
            elif pooling == SURPRISE:
                blocks.append(np.asarray(out[SURPRISE]).reshape(len(prompts), -1))
            else:
                wanted = [states.index(h) for h in source["hidden_states"]] if states else slice(None)
                blocks.append(np.asarray(out[pooling])[:, wanted].reshape(len(prompts), -1))
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def _source_encoder(self, index: int, source: dict) -> PrefillEncoder:
        """The second encoder of source `index`, loaded from its spec at the first call (and then kept)."""
        loaded = self.__dict__.setdefault("_source_encoders", {})
        if index not in loaded:
            record = source["encoder"]
            if not record.get("spec"):
                raise CheckpointError(f"feature source {index} ({source['pooling']}) names no encoder spec to load")
            from prefill_router.features import load_encoder

            second = load_encoder(_spec_from_dict(record["spec"]))
            check_identity(second, record["identity"], f" in feature source {index} ({source['pooling']})")
            loaded[index] = second
        encoder: PrefillEncoder = loaded[index]
        # The second encoder reads the routing window the main one reads (the gateway gives the main one its
        # window after loading), so a long prompt costs it no more than it costs the main encoder. Kept apart
        # per window: a serving copy of this router (which shares these encoders) must not change the original.
        window = getattr(getattr(self.encoder, "spec", None), "max_route_tokens", None)
        from prefill_router.features.encoder import Encoder

        if window and isinstance(encoder, Encoder) and encoder.spec.max_route_tokens != window:
            if (index, window) not in loaded:
                loaded[(index, window)] = encoder.with_route_window(window)
            encoder = loaded[(index, window)]
        return encoder

    def _embed(self, prompts: list, source: dict) -> np.ndarray:
        from prefill_router.features.semantic import default_model_dir, get_embedder, model_hash, prompt_text

        if not getattr(self, "_minilm_checked", False):
            found = model_hash(default_model_dir())
            if source.get("model") not in (None, found):
                raise CheckpointError(f"the router was trained on MiniLM embeddings of model files {source['model']}"
                                      f", but the installed model's files hash to {found}")
            self._minilm_checked = True
        return np.asarray(get_embedder().encode([prompt_text(p) for p in prompts], progress=False), dtype=np.float32)

    def encode(self, prompts: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """One encoder forward for the batch: (features [N, L, H], or [N, D] for several sources, input tokens
        [N], truncated [N], ms)."""
        encoder = self._require_encoder()
        prompts = list(prompts)
        start = time.perf_counter()
        X = self.features_of(encoder, prompts)
        ms = (time.perf_counter() - start) * 1e3
        # The lengths that same call measured (tokenizing again would double the CPU work per request).
        tokens = np.asarray(encoder.last_token_counts, dtype=np.float64).reshape(-1)
        if len(tokens) != len(prompts):
            raise EncoderError(f"{type(encoder).__name__}.last_token_counts holds {len(tokens)} counts after "
                               f"encoding {len(prompts)} prompts (see PrefillEncoder)")
        truncated = tokens > encoder.max_tokens  # the encoder cut these to max_tokens (keep head and tail)
        return X, tokens, truncated, ms

    def estimate_costs(self, input_tokens: np.ndarray) -> np.ndarray:
        """C[N, K] in USD from the cost model (zeros when the router has none)."""
        input_tokens = np.asarray(input_tokens, dtype=np.float64).reshape(-1)
        if self.cost_model is None:
            return np.zeros((len(input_tokens), len(self._targets)))
        return np.asarray(self.cost_model.estimate(input_tokens), dtype=np.float64)

    def predict_batch(self, prompts: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P[N, K], C[N, K], truncated[N]) for a batch of prompts, with ONE encoder forward. The gateway
        caches P and applies a per-request policy with `choose`."""
        X, tokens, truncated, _ = self.encode(prompts)
        return self.predict_proba_features(X), self.estimate_costs(tokens), truncated

    # -- the fast fallback scorer (router/fallback.py) -------------------------------------------------------
    def predict_fallback(self, prompts: Sequence[Prompt]) -> tuple[np.ndarray, np.ndarray]:
        """(P [N, K], input tokens [N]) from the fallback scorer: the token-embedding mean of the same routing
        window the encoder reads, a table lookup and one matrix product. It runs no transformer layer and no
        torch, and may be called from one thread while another runs the encoder. The encoder is loaded first
        if it is not yet (its tokenizer and embedding table are what the fallback reads)."""
        if self.fallback is None:
            raise CheckpointError("this router has no fallback scorer (its checkpoint was trained without one; "
                                  "train it again to add one)")
        X, tokens = self._embedding_mean()(list(prompts))
        return self.fallback.predict_proba(X), tokens.astype(np.float64)

    def _embedding_mean(self) -> EmbeddingMean:
        """The token-embedding mean of the encoder as routing reads it now (its window: the gateway gives the
        encoder its serving window), made once per window. The embedding table is read once and shared."""
        from prefill_router.features.embedding_mean import EmbeddingMean, input_embeddings

        encoder = self._require_encoder()
        spec = getattr(encoder, "spec", None)
        key = (getattr(spec, "max_route_tokens", None), encoder.max_tokens)
        made = self.__dict__.setdefault("_embedding_means", {})
        if key not in made:
            from prefill_router.features.encoder import Encoder

            if not isinstance(encoder, Encoder):
                raise EncoderError(f"the fallback scorer needs a local encoder's tokenizer and embedding table; "
                                   f"{type(encoder).__name__} has neither")
            if "table" not in made:
                made["table"] = input_embeddings(encoder)
            made[key] = EmbeddingMean.of(encoder, made["table"])
        featurizer: EmbeddingMean = made[key]
        return featurizer

    # -- policy --------------------------------------------------------------------------------------------
    def _default_policy_of(self, scorer: Scorer) -> str:
        if scorer == "prefill":
            return self.default_policy
        if scorer == "fallback":
            if self.fallback is None:
                raise ConfigError("scorer 'fallback': this router has no fallback scorer")
            return self.fallback.policy
        raise ConfigError(f"scorer: {scorer!r} is not one of {', '.join(SCORERS)}")

    def resolve_policy(self, policy: Policy | str | None = None, lam: float | None = None,
                       scorer: Scorer = "prefill") -> Policy:
        """A Policy object from: None (the default policy of `scorer`: the checkpoint's, or its fallback scorer's
        with scorer="fallback"), a spec string ("argmax", "tolerance:0.05", "utility:0.3", "fixed:0") or a
        Policy. `lam` asks for the utility policy with that cost weight (with policy=None, or a utility, argmax
        or fixed policy)."""
        if policy is None:
            policy = self._default_policy_of(scorer)
        elif scorer not in SCORERS:
            raise ConfigError(f"scorer: {scorer!r} is not one of {', '.join(SCORERS)}")
        if not isinstance(policy, str):
            if not callable(getattr(policy, "choose", None)):
                raise ConfigError(f"policy must be a spec string or have choose(P, C), got {policy!r}")
            return policy
        name = policy.strip().partition(":")[0].strip().lower()
        if lam is not None:
            if name not in ("utility", "argmax", "fixed"):
                raise ConfigError(f"lam applies to the utility policy, not to {policy!r}")
            return UtilityPolicy(float(lam))
        return policy_from_spec(policy)

    def describe_policy(self, policy: Policy | str | None = None, lam: float | None = None,
                        scorer: Scorer = "prefill") -> str:
        """The policy spec, with the target a "fixed:<k>" policy names: "fixed:0 (always gpt-4o)"."""
        chosen = self.resolve_policy(policy, lam, scorer)
        spec = getattr(chosen, "spec", None)  # the built-in policies have one; a user's Policy need not
        text = str(spec()) if callable(spec) else str(chosen)
        k = getattr(chosen, "k", None)
        return f"{text} (always {self._targets[k]})" if k is not None and k < len(self._targets) else text

    def choose(self, P: np.ndarray, C: np.ndarray, *, policy: Policy | str | None = None,
               lam: float | None = None, scorer: Scorer = "prefill") -> np.ndarray:
        """Target indices [N] for P [N, K] and costs C [N, K]; with policy and lam None, the default policy of
        `scorer` (pass scorer="fallback" for P from `predict_fallback`)."""
        return np.asarray(self.resolve_policy(policy, lam, scorer).choose(P, C), dtype=np.int64)

    # -- routing ---------------------------------------------------------------------------------------------
    def route_batch(self, prompts: Sequence[Prompt], *, policy: Policy | str | None = None,
                    lam: float | None = None) -> list[RouteDecision]:
        """One decision per prompt, from ONE encoder forward over the batch. latency_ms is the batch's
        encoder + transform + MLP + policy time (shared by every prompt in it)."""
        prompts = list(prompts)
        if not prompts:
            return []
        chosen_policy = self.resolve_policy(policy, lam)
        self._require_encoder()  # a first call loads the encoder: that is not routing time
        start = time.perf_counter()
        P, C, truncated = self.predict_batch(prompts)
        choice = np.asarray(chosen_policy.choose(P, C), dtype=np.int64)
        ms = (time.perf_counter() - start) * 1e3
        return [RouteDecision(target=self._targets[int(choice[i])],
                              probabilities={t: float(P[i, k]) for k, t in enumerate(self._targets)},
                              estimated_cost={t: float(C[i, k]) for k, t in enumerate(self._targets)},
                              latency_ms=ms, truncated=bool(truncated[i]))
                for i in range(len(prompts))]

    def route(self, prompt: Prompt | Message, *, policy: Policy | str | None = None,
              lam: float | None = None) -> RouteDecision:
        """Route one prompt: text, or chat messages [{"role": ..., "content": ...}, ...]."""
        return self.route_batch([[prompt] if isinstance(prompt, dict) else prompt], policy=policy, lam=lam)[0]

    # -- persistence (router/persistence.py) -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the checkpoint folder (see router/persistence.py)."""
        from prefill_router.router.persistence import save_router  # persistence builds Routers: import late

        return save_router(self, path)

    @classmethod
    def load(cls, path: str | Path, encoder: PrefillEncoder | None = None) -> Router:
        """Read a checkpoint folder. With `encoder` given, use it (refused when its identity differs from the
        checkpoint's); otherwise the encoder named in the checkpoint is loaded at the first routing call."""
        from prefill_router.router.persistence import load_router

        return load_router(path, encoder=encoder, cls=cls)


def _spec_from_dict(spec: dict) -> EncoderSpec:
    from prefill_router.features import EncoderSpec

    return EncoderSpec.model_validate(spec)
