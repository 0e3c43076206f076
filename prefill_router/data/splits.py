"""Prompt-level train/test splits and k-fold cross-validation without leakage.

Prompts that are the same after normalisation (lowercase, whitespace runs collapsed to one space, ends
stripped) always land on the same side, so a near-copy of a test prompt is never trained on. Splits can be
stratified by category, and the same seed always gives the same split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prompt import prompt_text
from prefill_router.errors import ConfigError

_SPACES = re.compile(r"\s+")


def normalize_prompt(prompt) -> str:
    """Lowercase, collapse whitespace, strip; chat messages are read as their joined contents."""
    return _SPACES.sub(" ", prompt_text(prompt).lower()).strip()


def duplicate_groups(prompts: Sequence) -> np.ndarray:
    """Cluster id per row: rows whose normalised prompts are equal share one id (numbered by first row)."""
    seen: dict[str, int] = {}
    return np.asarray([seen.setdefault(normalize_prompt(p), len(seen)) for p in prompts], dtype=np.int64)


def _inputs(ds_or_n, stratify) -> tuple[int, np.ndarray, np.ndarray | None]:
    """(n, duplicate cluster per row, stratum label per row or None)."""
    if isinstance(ds_or_n, RoutingDataset):
        n, clusters = ds_or_n.n, duplicate_groups(ds_or_n.prompts)
        groups = ds_or_n.groups
    elif isinstance(ds_or_n, (int, np.integer)) and not isinstance(ds_or_n, bool):
        n, clusters, groups = int(ds_or_n), np.arange(int(ds_or_n)), None
    else:
        raise ConfigError(f"expected a RoutingDataset or a row count, got {type(ds_or_n).__name__}")
    if stratify is None or stratify is False:
        return n, clusters, None
    if stratify is True:
        if groups is None:
            return n, clusters, None  # nothing to stratify by
        labels = groups
    else:
        labels = list(stratify)
    if len(labels) != n:
        raise ConfigError(f"stratify has {len(labels)} labels for {n} rows")
    return n, clusters, np.asarray([str(x) for x in labels], dtype=object)


def _cluster_table(clusters: np.ndarray, labels: np.ndarray | None):
    """Per cluster: its rows and its stratum (the label of its first row)."""
    order = np.argsort(clusters, kind="stable")
    bounds = np.flatnonzero(np.diff(clusters[order])) + 1
    members = np.split(order, bounds)
    strata = [None if labels is None else labels[m[0]] for m in members]
    return members, strata


def _apportion(total: int, sizes: list[int]) -> list[int]:
    """Integer shares of `total` proportional to `sizes` that add up to `total` (largest remainder)."""
    exact = [total * size / sum(sizes) for size in sizes]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def train_test_split(ds_or_n: RoutingDataset | int, test_size: float = 0.2, seed: int = 0,
                     stratify: bool | Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), sorted int64 row indices.

    test_size: a fraction in (0, 1) or a row count. stratify: None, True (the dataset's groups) or one label
    per row; each stratum then gives about test_size of its rows to the test side (a row count is shared out
    so that the test side holds exactly that many rows when no duplicate prompts are in the way).
    """
    n, clusters, labels = _inputs(ds_or_n, stratify)
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ConfigError(f"test_size={test_size} must lie in (0, 1) as a fraction, or be a row count")
        fraction = test_size
    elif isinstance(test_size, (int, np.integer)) and 0 < test_size < n:
        fraction = test_size / n
    else:
        raise ConfigError(f"test_size={test_size!r} must be a fraction in (0, 1) "
                          f"or a row count in [1, {n - 1}]")
    if n < 2:
        raise ConfigError(f"cannot split {n} row(s)")
    members, strata = _cluster_table(clusters, labels)
    order = list(dict.fromkeys(strata))
    chosen_by = {stratum: [c for c, s in enumerate(strata) if s == stratum] for stratum in order}
    rows_by = [sum(len(members[c]) for c in chosen_by[stratum]) for stratum in order]
    if isinstance(test_size, float):
        goals = [round(rows * fraction) for rows in rows_by]
    else:  # a row count: share it out by largest remainder, so the strata add up to exactly that count
        goals = _apportion(int(test_size), rows_by)
    rng = np.random.default_rng(seed)
    test = np.zeros(n, dtype=bool)
    for stratum, goal in zip(order, goals):
        chosen = chosen_by[stratum]
        taken = 0
        for c in rng.permutation(chosen):
            size = len(members[c])
            if taken + size <= goal:
                test[members[c]] = True
                taken += size
    if not test.any() or test.all():
        raise ConfigError(f"test_size={test_size!r} leaves one side empty for {n} rows "
                          f"in {len(members)} distinct prompts")
    return np.flatnonzero(~test), np.flatnonzero(test)


def kfold(ds_or_n: RoutingDataset | int, k: int = 5, seed: int = 0,
          stratify: bool | Sequence | None = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_idx, test_idx) pairs; every row is in exactly one test fold.

    Duplicate clusters stay within one fold. With stratify (True = the dataset's groups, when it has any),
    each stratum is spread evenly over the folds.
    """
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k={k!r} must be an integer >= 2")
    n, clusters, labels = _inputs(ds_or_n, stratify)
    members, strata = _cluster_table(clusters, labels)
    if len(members) < k:
        raise ConfigError(f"k={k} folds need at least {k} distinct prompts, found {len(members)}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=np.int64)
    total = np.zeros(k, dtype=np.int64)
    for stratum in dict.fromkeys(strata):
        chosen = rng.permutation([c for c, s in enumerate(strata) if s == stratum])
        # Largest clusters first, each into the fold that is smallest within this stratum (ties: smallest
        # overall, then a seeded fold order), which keeps folds balanced in size and in strata.
        chosen = sorted(chosen, key=lambda c: -len(members[c]))
        within = np.zeros(k, dtype=np.int64)
        tie = rng.permutation(k)
        for c in chosen:
            f = min(range(k), key=lambda j: (within[j], total[j], tie[j]))
            fold_of[members[c]] = f
            within[f] += len(members[c])
            total[f] += len(members[c])
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def stratified_sample(ds_or_n: RoutingDataset | int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded sample of about `size` rows, each category (the dataset's groups)
    represented in proportion; duplicate prompts are taken or left together. `size` >= the row count gives
    every row. The same dataset, size and seed always give the same rows, so `extract --sample` and
    `evaluate --sample` agree on them."""
    n = ds_or_n if isinstance(ds_or_n, (int, np.integer)) else ds_or_n.n
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"sample size {size!r} must be a positive number of prompts")
    if size >= n:
        return np.arange(n)
    return train_test_split(ds_or_n, test_size=int(size), seed=seed, stratify=True)[1]
