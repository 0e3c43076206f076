"""Prompt-level splits: no duplicate straddles, stratification, determinism, k-fold partitions."""

from __future__ import annotations

import numpy as np
import pytest

from prefill_router.data import RoutingDataset, kfold, normalize_prompt, stratified_sample, train_test_split
from prefill_router.errors import ConfigError


def make_ds(prompts, groups=None) -> RoutingDataset:
    n = len(prompts)
    return RoutingDataset([str(i) for i in range(n)], list(prompts), ["a", "b"], np.zeros((n, 2)),
                          np.zeros((n, 2)), groups=groups)


def with_duplicates(n_unique: int = 60) -> RoutingDataset:
    """Unique prompts plus near-copies that differ only in case and whitespace, and a chat-message copy."""
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(n_unique)]
    prompts += [f"  QUESTION number {i}:\twhat is {i} +  {i}?\n" for i in range(0, n_unique, 3)]
    prompts += [[{"role": "user", "content": f"question NUMBER {i}: what is {i} + {i}?"}]
                for i in range(0, n_unique, 7)]
    groups = [f"g{i % 3}" for i in range(len(prompts))]
    return make_ds(prompts, groups)


def test_normalize_prompt():
    assert normalize_prompt("  Hello \n\t World  ") == "hello world"
    assert normalize_prompt([{"role": "user", "content": "Hello"}, {"role": "user", "content": "World"}]) \
        == "hello world"


@pytest.mark.parametrize("seed", range(8))
def test_duplicates_never_straddle_the_split(seed):
    ds = with_duplicates()
    train, test = train_test_split(ds, test_size=0.3, seed=seed)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == ds.n
    train_keys = {normalize_prompt(ds.prompts[i]) for i in train}
    test_keys = {normalize_prompt(ds.prompts[i]) for i in test}
    assert not train_keys & test_keys


def test_stratification_keeps_category_proportions():
    groups = ["a"] * 60 + ["b"] * 40 + ["c"] * 20
    ds = make_ds([f"prompt {i}" for i in range(120)], groups)
    _, test = train_test_split(ds, test_size=0.25, seed=3, stratify=ds.groups)
    labels = np.asarray(groups)
    # 25% of each category, exactly, since no prompt repeats
    assert [(labels[test] == g).sum() for g in "abc"] == [15, 10, 5]
    same = train_test_split(ds, test_size=0.25, seed=3, stratify=True)  # True = the dataset's groups
    np.testing.assert_array_equal(same[1], test)


def test_seeds_are_deterministic_and_matter():
    ds = with_duplicates()
    a = train_test_split(ds, seed=11)
    b = train_test_split(ds, seed=11)
    c = train_test_split(ds, seed=12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert [f[1].tolist() for f in kfold(ds, k=4, seed=5)] == [f[1].tolist() for f in kfold(ds, k=4, seed=5)]


def test_split_from_a_row_count_and_test_size_as_count():
    train, test = train_test_split(50, test_size=10, seed=0)
    assert len(test) == 10 and len(train) == 40
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(50))
    assert train.dtype == np.int64 and np.all(np.diff(test) > 0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 0, 50])
def test_bad_test_size_is_refused(bad):
    with pytest.raises(ConfigError, match="test_size"):
        train_test_split(50, test_size=bad)


@pytest.mark.parametrize("k", [2, 5])
def test_kfold_partitions_every_row_once(k):
    ds = with_duplicates()
    folds = kfold(ds, k=k, seed=1)
    assert len(folds) == k
    tests = np.concatenate([t for _, t in folds])
    assert sorted(tests.tolist()) == list(range(ds.n))  # every row exactly once
    for train, test in folds:
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(ds.n))
        train_keys = {normalize_prompt(ds.prompts[i]) for i in train}
        assert not train_keys & {normalize_prompt(ds.prompts[i]) for i in test}
    sizes = [len(t) for _, t in folds]
    assert max(sizes) - min(sizes) <= 3  # clusters are at most 3 rows


def test_kfold_stratifies_by_category():
    groups = ["a"] * 50 + ["b"] * 25
    ds = make_ds([f"prompt {i}" for i in range(75)], groups)
    labels = np.asarray(groups)
    for _, test in kfold(ds, k=5, seed=0):
        assert (labels[test] == "a").sum() == 10 and (labels[test] == "b").sum() == 5


def test_kfold_needs_enough_distinct_prompts():
    ds = make_ds(["same", "SAME ", "same", "other"])
    with pytest.raises(ConfigError, match="distinct prompts"):
        kfold(ds, k=3)
    with pytest.raises(ConfigError, match="k="):
        kfold(ds, k=1)


def test_stratified_sample_keeps_proportions_and_is_reproducible():
    groups = ["a"] * 60 + ["b"] * 40 + ["c"] * 20
    ds = make_ds([f"prompt {i}" for i in range(120)], groups)
    rows = stratified_sample(ds, 30, seed=1)
    assert rows.size == 30 and np.all(np.diff(rows) > 0)  # sorted, no repeats
    labels = np.asarray(groups)
    assert [(labels[rows] == g).sum() for g in "abc"] == [15, 10, 5]
    np.testing.assert_array_equal(stratified_sample(ds, 30, seed=1), rows)
    assert not np.array_equal(stratified_sample(ds, 30, seed=2), rows)
    np.testing.assert_array_equal(stratified_sample(ds, 500), np.arange(120))  # more than there is: all rows
    with pytest.raises(ConfigError, match="positive"):
        stratified_sample(ds, 0)


def test_a_row_count_is_met_exactly_across_strata():
    # 3 strata of 7: 10 / 21 of each is 3.33, which rounds to 9 in all; the count must still be 10.
    ds = make_ds([f"prompt {i}" for i in range(21)], [f"g{i % 3}" for i in range(21)])
    for size in (1, 10, 11, 20):
        _, test = train_test_split(ds, test_size=size, seed=0, stratify=True)
        assert test.size == size
        assert stratified_sample(ds, size).size == size
