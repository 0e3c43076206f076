"""The one in-memory routing dataset every stage reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

# Notes that describe how C was computed start with COST_NOTE_PREFIX, so that recomputing C can replace them.
from prefill_router.data.prices import COST_NOTE_PREFIX
from prefill_router.data.prompt import Prompt
from prefill_router.errors import ConfigError, DataError

if TYPE_CHECKING:
    from prefill_router.data.prices import CostModel, PriceTable

# The values of `RoutingDataset.splits`: a training prompt, or one held out from training.
SPLITS = ("train", "test")

@dataclass
class RoutingDataset:
    """Prompts, target names, labels and costs.

    Y[i, k] in [0, 1] is how well target k answered prompt i (1 = correct); NaN where target k was not run.
    C[i, k] is the cost in USD of sending prompt i to target k; NaN where unknown.
    groups, when given, is a category per prompt (used for stratified splits and per-category reports).
    notes collects caveats a report must repeat (for example imputed output-token counts).
    input_tokens[i], when known, is the prompt's token count; output_tokens[i, k] the answer length of
    target k in tokens, NaN where unknown. prices, when known, is the table C was computed from. Together
    they let `with_costs` recompute C with output lengths imputed from training rows only.
    splits, when given, is the data file's own split per prompt ("train" or "test", see SPLITS).
    """

    prompt_ids: list[str]
    prompts: list[Prompt]
    targets: list[str]
    Y: np.ndarray
    C: np.ndarray
    groups: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    input_tokens: np.ndarray | None = None  # [N]
    output_tokens: np.ndarray | None = None  # [N, K], NaN where unknown
    prices: PriceTable | None = None
    splits: list[str] | None = None

    def __post_init__(self) -> None:
        self.Y = np.asarray(self.Y, dtype=np.float64)
        self.C = np.asarray(self.C, dtype=np.float64)
        n, k = len(self.prompt_ids), len(self.targets)
        if self.input_tokens is not None:
            self.input_tokens = np.asarray(self.input_tokens, dtype=np.float64)
            if self.input_tokens.shape != (n,):
                raise DataError(f"input_tokens has shape {self.input_tokens.shape}, expected ({n},)")
        if self.output_tokens is not None:
            self.output_tokens = np.asarray(self.output_tokens, dtype=np.float64)
            if self.output_tokens.shape != (n, k):
                raise DataError(f"output_tokens has shape {self.output_tokens.shape}, expected ({n}, {k})")
        if len(self.prompts) != n:
            raise DataError(f"prompts has {len(self.prompts)} entries, prompt_ids has {n}")
        if self.Y.shape != (n, k):
            raise DataError(f"Y has shape {self.Y.shape}, expected ({n}, {k})")
        if self.C.shape != (n, k):
            raise DataError(f"C has shape {self.C.shape}, expected ({n}, {k})")
        if self.groups is not None and len(self.groups) != n:
            raise DataError(f"groups has {len(self.groups)} entries, expected {n}")
        if self.splits is not None:
            if len(self.splits) != n:
                raise DataError(f"splits has {len(self.splits)} entries, expected {n}")
            unknown = sorted(set(self.splits) - set(SPLITS))
            if unknown:
                raise DataError(f"unknown split value(s) {unknown}; expected {SPLITS}")
        if len(set(self.targets)) != k:
            raise DataError(f"target names repeat: {self.targets}")

    def split_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, held-out rows) of the file's own split; a ConfigError when the dataset has none."""
        if self.splits is None:
            raise ConfigError("the dataset has no split column", field="split_col")
        test = np.asarray([s == "test" for s in self.splits], dtype=bool)
        return np.flatnonzero(~test), np.flatnonzero(test)

    @property
    def n(self) -> int:
        return len(self.prompt_ids)

    @property
    def k(self) -> int:
        return len(self.targets)

    def subset(self, rows: Sequence[int] | np.ndarray) -> RoutingDataset:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return RoutingDataset(
            prompt_ids=[self.prompt_ids[i] for i in rows],
            prompts=[self.prompts[i] for i in rows],
            targets=list(self.targets),
            Y=self.Y[rows],
            C=self.C[rows],
            groups=None if self.groups is None else [self.groups[i] for i in rows],
            notes=list(self.notes),
            input_tokens=None if self.input_tokens is None else self.input_tokens[rows],
            output_tokens=None if self.output_tokens is None else self.output_tokens[rows],
            prices=self.prices,
            splits=None if self.splits is None else [self.splits[i] for i in rows],
        )

    def select_targets(self, names: Sequence[str]) -> RoutingDataset:
        unknown = [t for t in names if t not in self.targets]
        if unknown:
            raise ConfigError(f"unknown target(s) {unknown}; known: {self.targets}")
        cols = [self.targets.index(t) for t in names]
        return RoutingDataset(self.prompt_ids, self.prompts, list(names), self.Y[:, cols], self.C[:, cols],
                              self.groups, list(self.notes), input_tokens=self.input_tokens,
                              output_tokens=(None if self.output_tokens is None
                                             else self.output_tokens[:, cols]),
                              prices=self.prices, splits=self.splits)

    def with_costs(self, cost_model: CostModel) -> RoutingDataset:
        """A copy whose C is recomputed by `cost_model` from this dataset's token counts.

        Known output lengths are used as they are; unknown ones take the model's medians, which
        `CostModel.fit(dataset, train_rows)` computes over training rows only.
        """
        C = cost_model.costs(self)
        # Earlier cost notes describe the costs being replaced, so they go.
        notes = [n for n in self.notes if not n.startswith(COST_NOTE_PREFIX)] + list(cost_model.notes)
        return RoutingDataset(self.prompt_ids, self.prompts, list(self.targets), self.Y, C, self.groups,
                              notes,
                              input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                              prices=cost_model.prices, splits=self.splits)
