"""SharedTrunkNet ensemble, masked loss, feature transform and out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefill_router.errors import ConfigError, DataError
from prefill_router.router.base import out_of_fold_proba
from prefill_router.router.baselines import check_labels
from prefill_router.router.transform import FeatureTransform, SourceTransform, select_hidden_states
from prefill_router.router.trunk import SharedTrunkNet, TrunkConfig, TrunkEnsemble, masked_bce, split_labels

FAST = dict(seeds=2, keep=1, max_epochs=15, patience=5, batch_size=64, threads=1)


def _synthetic(n=240, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    W = rng.normal(size=(d, k)) * 2.0
    Y = (rng.random((n, k)) < 1 / (1 + np.exp(-X @ W))).astype(np.float64)
    return X, Y


def _auc(y, p):
    from sklearn.metrics import roc_auc_score
    return roc_auc_score(y, p)


# ---- masked loss ---------------------------------------------------------------------------------------

def test_masked_bce_is_the_mean_over_observed_entries_and_ignores_missing_ones():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]], requires_grad=True)
    Y = np.array([[1.0, np.nan, 0.0], [np.nan, 0.25, 1.0]])
    targets, mask = split_labels(Y)
    loss = masked_bce(logits, torch.from_numpy(targets), torch.from_numpy(mask))

    def bce(z, y):
        p = 1 / (1 + np.exp(-z))
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))

    by_hand = np.mean([bce(0.5, 1.0), bce(2.0, 0.0), bce(0.0, 0.25), bce(-0.3, 1.0)])
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    grad = logits.grad.numpy()
    assert grad[0, 1] == 0.0 and grad[1, 0] == 0.0          # no gradient from a missing label
    assert np.all(grad[np.isfinite(Y)] != 0.0)


def test_split_labels_rejects_labels_outside_unit_interval():
    # The same DataError as every baseline predictor's check_labels gives for the same bad labels.
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        split_labels(np.array([[0.0, 1.5]]))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        check_labels(np.array([[0.0, 1.5]]))


def test_rows_without_any_label_change_nothing():
    X, Y = _synthetic()
    rng = np.random.default_rng(1)
    X_extra = np.concatenate([X, rng.normal(size=(50, X.shape[1])).astype(np.float32)])
    Y_extra = np.concatenate([Y, np.full((50, Y.shape[1]), np.nan)])
    a = TrunkEnsemble(**FAST).fit(X, Y).predict_proba(X)
    b = TrunkEnsemble(**FAST).fit(X_extra, Y_extra).predict_proba(X)
    assert np.array_equal(a, b)


def test_missing_labels_are_not_treated_as_wrong():
    X, _ = _synthetic(n=200)
    Y = np.ones((200, 2))
    Y[::2, 1] = np.nan                       # target 1: right whenever it was run, not run on half the rows
    cfg = dict(FAST, max_epochs=40, patience=40)
    P_missing = TrunkEnsemble(**cfg).fit(X, Y).predict_proba(X)
    Y_zero = np.where(np.isnan(Y), 0.0, Y)
    P_zero = TrunkEnsemble(**cfg).fit(X, Y_zero).predict_proba(X)
    assert P_missing[:, 1].mean() > 0.8      # learned "always right" from the rows that have a label
    assert P_zero[:, 1].mean() < 0.7         # filling NaN with 0 would have taught it otherwise


def test_soft_labels_are_learned_as_probabilities():
    X, _ = _synthetic(n=300)
    Y = np.full((300, 1), 0.3)
    P = TrunkEnsemble(**dict(FAST, max_epochs=60, patience=60, lr=5e-3)).fit(X, Y).predict_proba(X)
    assert abs(P.mean() - 0.3) < 0.05


# ---- ensemble ------------------------------------------------------------------------------------------

def test_ensemble_learns_signal_is_deterministic_and_keeps_best_seeds():
    X, Y = _synthetic(n=400)
    cfg = dict(FAST, seeds=4, keep=2, max_epochs=30, patience=10)
    ens = TrunkEnsemble(**cfg).fit(X[:300], Y[:300])
    P = ens.predict_proba(X[300:])
    assert P.shape == (100, 3) and np.all((P > 0) & (P < 1))
    assert np.mean([_auc(Y[300:, k], P[:, k]) for k in range(3)]) > 0.75
    assert sorted(ens.all_val_losses)[:2] == ens.val_losses
    assert len(ens.members) == 2 and set(ens.member_seeds) <= {0, 1, 2, 3}
    again = TrunkEnsemble(**cfg).fit(X[:300], Y[:300]).predict_proba(X[300:])
    assert np.array_equal(P, again)
    other = TrunkEnsemble(**dict(cfg, seed=7)).fit(X[:300], Y[:300]).predict_proba(X[300:])
    assert not np.array_equal(P, other)


def test_network_shape_follows_the_recipe():
    net = SharedTrunkNet(200, 28)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(256, 200), (256,), (128, 256), (128,), (28, 128), (28,)]
    dropouts = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.3, 0.2]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="lr"):
        TrunkConfig.parse({"lr": -1})
    with pytest.raises(ConfigError, match="keep"):
        TrunkConfig.parse({"seeds": 2, "keep": 3})
    with pytest.raises(ConfigError, match="epochs"):
        TrunkConfig.parse({"epochs": 3})
    with pytest.raises(ConfigError, match="not fitted"):
        TrunkEnsemble().predict_proba(np.zeros((1, 3)))


# ---- transform -----------------------------------------------------------------------------------------

def test_transform_standardises_then_projects_on_training_rows_only():
    rng = np.random.default_rng(0)
    # rank-2 signal in 10 dims, plus a constant dim that must not divide by zero
    base = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 10))
    X = np.concatenate([base, np.full((300, 1), 5.0)], axis=1).reshape(300, 1, 11).astype(np.float32)
    t = FeatureTransform(dims=3).fit(X[:200])
    assert np.allclose(t.mean, X[:200].reshape(200, -1).mean(axis=0), atol=1e-5)
    assert t.scale[-1] == 1.0
    Z = t.transform(X)
    assert Z.shape == (300, 3)
    # two components carry everything; the third is numerical noise
    assert t.explained_variance[2] < 1e-6 * t.explained_variance[0]
    z = (X.reshape(300, -1) - t.mean) / t.scale
    assert np.allclose(Z, (z - t.pca_mean) @ t.components.T, atol=1e-4)
    with pytest.raises(ConfigError, match="per-row shape"):
        t.transform(np.zeros((2, 12), dtype=np.float32))


def test_transform_state_round_trips_exactly():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2, 8)).astype(np.float32)
    t = FeatureTransform(dims=4).fit(X)
    back = FeatureTransform.from_state(t.meta(), t.state_arrays())
    assert np.array_equal(t.transform(X), back.transform(X))
    no_pca = FeatureTransform(dims=None).fit(X)
    assert no_pca.transform(X).shape == (50, 16)


def test_select_hidden_states_by_index():
    X = np.arange(2 * 3 * 2).reshape(2, 3, 2)
    assert np.array_equal(select_hidden_states(X, [0, 6, 12], [12, 0]), X[:, [2, 0], :])
    with pytest.raises(ConfigError, match=r"\[18\]"):
        select_hidden_states(X, [0, 6, 12], [18])


# ---- out-of-fold predictions ---------------------------------------------------------------------------

def test_out_of_fold_predictions_never_see_their_own_row():
    class Memorise:
        def fit(self, X, Y):
            self.seen = {float(x) for x in X[:, 0]}
            return self

        def predict_proba(self, X):
            return np.array([[1.0 if float(x) in self.seen else 0.0] for x in X[:, 0]])

    X = np.arange(30, dtype=float).reshape(30, 1)
    P = out_of_fold_proba(X, np.zeros((30, 1)), Memorise, folds=3)
    assert np.all(P == 0.0)


def test_source_transform_reduces_each_source_on_its_own():
    rng = np.random.default_rng(0)
    # source a: wide and loud; source b: narrow and quiet, with one strong direction a joint PCA would drown
    a = rng.normal(0, 100.0, (300, 40))
    latent = rng.normal(size=300)
    b = np.outer(latent, rng.normal(size=6)) * 0.01 + rng.normal(0, 1e-4, (300, 6))
    X = np.concatenate([a, b], axis=1)
    t = SourceTransform((40, 6), dims=3).fit(X[:200])
    Z = t.transform(X[200:])
    assert Z.shape == (100, 6)
    alone = [FeatureTransform(3).fit(part[:200]).transform(part[200:]) for part in (a, b)]
    np.testing.assert_allclose(Z, np.concatenate(alone, axis=1), rtol=1e-5, atol=1e-5)
    # b's strong direction is its first component; it survives on its own block
    assert abs(np.corrcoef(Z[:, 3], latent[200:])[0, 1]) > 0.99
    with pytest.raises(ConfigError, match="sum to 46"):
        t.transform(X[:, :45])
    with pytest.raises(ConfigError, match="not fitted"):
        SourceTransform((40, 6)).transform(X)
