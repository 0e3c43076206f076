"""The contenders that `prefill-router evaluate` (and any caller of the harness) can pick by name.

A contender is built from the loaded data (an `EvalInputs`) and returns its predictor factory and input rows;
`build_contenders(names, dataset, settings)` turns names into the harness's `Contender`s. Features that several
contenders read (MiniLM embeddings, prefill activations) are computed once per `EvalInputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from prefill_router.errors import ConfigError

if TYPE_CHECKING:  # the harness pulls in the report and plotting; the CLI imports this module for its --help
    from prefill_router.evaluate.harness import Contender


@dataclass
class ContenderSettings:
    """The knobs of the registered contenders (the `evaluate` command's options of the same names)."""

    cache_dir: str | None = None        # embedding cache folder
    batch_size: int = 64                # embedding batch size
    embedding_model: str | None = None  # sentence-embedding model folder; None: the shipped MiniLM
    features: str | None = None         # feature store of the prefill-* contenders
    pooling: str = "mean"
    pca: int = 200
    seeds: int = 10
    keep: int = 5
    seed: int = 0
    threads: int = 1
    knn_k: int = 20
    logreg_c: float = 1.0


@dataclass
class EvalInputs:
    """What contender builders may use: the dataset, the settings, and lazily computed prompt features."""

    dataset: Any  # RoutingDataset
    settings: ContenderSettings
    _cache: dict = field(default_factory=dict)

    def texts(self) -> np.ndarray:
        """Prompt texts as an object array (chat messages joined), one per row."""
        if "texts" not in self._cache:
            from prefill_router.features.semantic import prompt_text

            self._cache["texts"] = np.array([prompt_text(p) for p in self.dataset.prompts], dtype=object)
        return self._cache["texts"]

    def embeddings(self) -> np.ndarray:
        """Sentence embeddings [N, dim] of every prompt, read from / written to the embedding cache."""
        if "embeddings" not in self._cache:
            from prefill_router.features.semantic import embed_texts

            self._cache["embeddings"] = embed_texts(
                self.dataset.prompts, cache_dir=self.settings.cache_dir, batch_size=self.settings.batch_size,
                model_dir=self.settings.embedding_model)
        return self._cache["embeddings"]

    def row_ids(self) -> np.ndarray:
        return np.arange(self.dataset.n)[:, None]

    def prefill_features(self) -> np.ndarray:
        """[N, layers * hidden] prefill features of every prompt from the --features store (hidden states of
        --pooling concatenated); every row must be done."""
        if "prefill" not in self._cache:
            from prefill_router.features import FeatureSet

            if not self.settings.features:
                raise ConfigError("the prefill contenders need a feature store (from `prefill-router extract`)",
                                  field="features")
            fs = FeatureSet.open(self.settings.features)
            rows = fs.rows_of(self.dataset.prompts)
            missing = int((~fs.done[rows]).sum())
            if missing:
                raise ConfigError(f"{missing} of the dataset's rows are not extracted yet; rerun "
                                  f"`prefill-router extract` on the same store to finish them", field="features")
            X = fs.get(self.settings.pooling, rows=rows)
            self._cache["prefill"] = X.reshape(len(X), -1)
        return self._cache["prefill"]


@dataclass
class ContenderSpec:
    """A registered contender: `label` names its report row; `build(inputs)` returns (make_predictor, X)."""

    label: str
    description: str
    build: Callable[[EvalInputs], tuple[Callable[[], Any], Any]]


def _knn(inputs: EvalInputs):
    from prefill_router.router.baselines import KNNPredictor

    settings = inputs.settings
    return (lambda: KNNPredictor(k=settings.knn_k, metric="cosine", threads=settings.threads)), inputs.embeddings()


def _logreg(inputs: EvalInputs):
    from prefill_router.router.baselines import LogisticPredictor

    return (lambda: LogisticPredictor(C=inputs.settings.logreg_c, threads=inputs.settings.threads)), inputs.embeddings()


def _mlp(inputs: EvalInputs):
    from prefill_router.router.baselines import MLPPredictor

    return (lambda: MLPPredictor(seed=inputs.settings.seed, threads=inputs.settings.threads)), inputs.embeddings()


def _tfidf(inputs: EvalInputs):
    from prefill_router.router.baselines import TfidfLogisticPredictor

    return (lambda: TfidfLogisticPredictor(C=inputs.settings.logreg_c, threads=inputs.settings.threads)), inputs.texts()


def _prior(inputs: EvalInputs):
    from prefill_router.router.baselines import PriorPredictor

    return PriorPredictor, inputs.row_ids()


def _label_oracle(inputs: EvalInputs):
    from prefill_router.router.baselines import OraclePredictor

    Y = inputs.dataset.Y
    return (lambda: OraclePredictor(Y)), inputs.row_ids()


def _prefill(kind: str):
    """Builder of the `kind` contender ("prefill-trunk" or "prefill-logreg") of
    `evaluate.prefill.prefill_contenders`, all pools' columns, sharing one fit cache per command."""

    def build(inputs: EvalInputs):
        from prefill_router.evaluate.prefill import FitCache, PrefillSettings, prefill_contenders
        from prefill_router.router.trunk import TrunkConfig

        X = inputs.prefill_features()
        settings = PrefillSettings(pca=inputs.settings.pca, trunk=TrunkConfig(seeds=inputs.settings.seeds,
                                                                          keep=inputs.settings.keep,
                                                                          seed=inputs.settings.seed,
                                                                          threads=inputs.settings.threads))
        cache = inputs._cache.setdefault("fit_cache", FitCache())
        ds = inputs.dataset
        contenders = prefill_contenders(X, ds.Y, ds.C, list(range(ds.k)), inputs.settings.pooling, settings, cache)
        contender = next(c for c in contenders if c.name.startswith(f"{kind} ["))
        return contender.make_predictor, contender.X

    return build


CONTENDERS: dict[str, ContenderSpec] = {
    "knn": ContenderSpec("knn-minilm", "mean label of the k nearest training prompts (MiniLM cosine)", _knn),
    "logreg": ContenderSpec("logreg-minilm", "logistic regression per target on MiniLM embeddings", _logreg),
    "mlp": ContenderSpec("mlp-minilm", "multi-output MLP on MiniLM embeddings, masked BCE", _mlp),
    "tfidf": ContenderSpec("tfidf-logreg", "TF-IDF word 1-2 grams, logistic regression per target", _tfidf),
    "prefill-trunk": ContenderSpec("prefill-trunk", "SharedTrunkNet ensemble on --features (scaler + PCA)",
                                   _prefill("prefill-trunk")),
    "prefill-logreg": ContenderSpec("prefill-logreg", "logistic regression per target on --features",
                                    _prefill("prefill-logreg")),
    "prior": ContenderSpec("prior", "each target's training accuracy for every prompt", _prior),
    "label-oracle": ContenderSpec("label-oracle", "predicts the true labels (a check: near-oracle numbers)",
                                  _label_oracle),
}


def check_contenders(names: list[str]) -> list[str]:
    """`names` when each is a key of CONTENDERS, once; else a ConfigError (field "contenders")."""
    unknown = [c for c in names if c not in CONTENDERS]
    if unknown:
        raise ConfigError(f"unknown contender(s) {unknown}; known: {sorted(CONTENDERS)}", field="contenders")
    if len(set(names)) != len(names):
        raise ConfigError(f"a name repeats in {names}", field="contenders")
    return names


def build_contenders(names: list[str], dataset: Any, settings: ContenderSettings) -> list[Contender]:
    """The harness's Contender for each registered name, sharing one EvalInputs (so embeddings and prefill
    features are computed once)."""
    from prefill_router.evaluate.harness import Contender

    inputs = EvalInputs(dataset, settings)
    contenders = []
    for key in check_contenders(names):
        spec = CONTENDERS[key]
        make, X = spec.build(inputs)
        contenders.append(Contender(spec.label, make, X))
    return contenders
