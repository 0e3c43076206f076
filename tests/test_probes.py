"""Layer probes on synthetic data whose separation and rank are known."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from prefill_router.errors import ConfigError
from prefill_router.probes import (
    LayerReport,
    effective_dimensionality,
    fisher_diag,
    fisher_j,
    outlier_dimensions,
    probe_auc,
    probe_layer,
    rank_agreement,
    run_probes,
    select_layers,
    ternary_search_layer,
    write_probe_outputs,
)


def _two_gaussians(delta: float, n: int = 4000, d: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.5
    X = rng.normal(size=(n, d))
    X[y, 0] += delta
    return X, y


def test_fisher_j_matches_the_squared_mean_distance_for_identity_covariance():
    for delta in (0.5, 1.0, 2.0):
        X, y = _two_gaussians(delta)
        assert fisher_j(X, y, n_components=None, shrinkage=0.0) == pytest.approx(delta ** 2, rel=0.1)


def test_fisher_j_grows_with_separation_also_with_pca_and_shrinkage():
    values = [fisher_j(*_two_gaussians(delta, d=20), n_components=5, shrinkage=0.1) for delta in (0.0, 0.5, 1, 2)]
    assert values == sorted(values) and values[0] < 0.02 and values[-1] > 2.0


def test_fisher_diag_by_hand():
    X = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 3.0], [6.0, 5.0]])
    y = np.array([0, 0, 1, 1])
    # dim 0: means 1 and 5, variances 1 and 1 -> 16 / 2 = 8; dim 1: means 1 and 4, variances 0 and 1 -> 9
    assert fisher_diag(X, y) == pytest.approx((8 + 9) / 2)
    assert np.isnan(fisher_diag(X, np.ones(4)))
    X, y = _two_gaussians(2.0, d=4)
    assert fisher_diag(X, y) == pytest.approx(4.0 / 2 / 4, rel=0.15)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_effective_dimensionality_of_isotropic_rank_r_data_is_r(rank):
    rng = np.random.default_rng(rank)
    basis, _ = np.linalg.qr(rng.normal(size=(40, rank)))
    X = rng.normal(size=(5000, rank)) @ basis.T * 3.0 + 7.0
    pr, ent = effective_dimensionality(X)
    assert pr == pytest.approx(rank, rel=0.05)
    assert ent == pytest.approx(rank, rel=0.05)


def test_effective_dimensionality_with_fewer_rows_than_dims():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(300, 2)))
    X = rng.normal(size=(100, 2)) @ basis.T
    pr, _ = effective_dimensionality(X)
    assert 1.5 < pr <= 2.0


def test_probe_auc_sees_signal_and_not_noise():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 10))
    Y = np.stack([(X[:, 0] + 0.3 * rng.normal(size=600) > 0), rng.random(600) < 0.5], axis=1).astype(float)
    Y[::5, 0] = np.nan
    auc = probe_auc(X, Y, folds=3, probe_pca=None)
    assert auc[0] > 0.9
    assert 0.35 < auc[1] < 0.65


def test_ternary_search_finds_the_peak_with_few_evaluations():
    layers = list(range(31))
    best, seen = ternary_search_layer(layers, lambda layer: -(layer - 19) ** 2)
    assert best == 19
    assert len(seen) < 15


def _report(state, j, auc, pooling="mean"):
    return LayerReport(pooling, state, 10.0, 9.0, {"a": j}, {"a": j / 10}, {"a": auc})


def test_rank_agreement_and_selection():
    reports = [_report(0, 0.1, 0.55), _report(6, 0.3, 0.60), _report(12, 0.2, 0.58), _report(18, 0.5, 0.70)]
    assert rank_agreement(reports)["mean"] == pytest.approx(1.0)
    reports.append(_report(24, 0.6, 0.52))
    assert rank_agreement(reports)["mean"] < 1.0
    assert select_layers(reports, "j") == [24]
    assert select_layers(reports, "auc") == [18]
    assert select_layers(reports, "all") == [0, 6, 12, 18, 24]


def test_run_probes_finds_the_informative_layer_and_writes_outputs(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    y = rng.random(n) < 0.5
    X = rng.normal(size=(n, 3, 8))
    X[y, 1, :2] += 1.5                      # only hidden state 6 (position 1) carries the label
    Y = np.stack([y, rng.random(n) < 0.5], axis=1).astype(float)
    reports = run_probes({"mean": X, "last": X[:, :2]}, Y, ["t0", "t1"], np.arange(300),
                         hidden_states={"mean": [0, 6, 12], "last": [0, 6]}, n_components=4, probe_pca=4,
                         progress=False)
    assert [(r.pooling, r.hidden_state) for r in reports] == [("mean", 0), ("mean", 6), ("mean", 12),
                                                              ("last", 0), ("last", 6)]
    by = {(r.pooling, r.hidden_state): r for r in reports}
    assert by["mean", 6].fisher_j["t0"] > 5 * by["mean", 0].fisher_j["t0"]
    assert by["mean", 6].auc["t0"] > 0.8 and by["mean", 0].auc["t0"] < 0.7
    assert select_layers(reports, "j") == [6] and select_layers(reports, "auc") == [6]
    paths = write_probe_outputs(reports, tmp_path / "probes")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 2
    assert paths["png"].stat().st_size > 1000
    assert "Spearman" in paths["md"].read_text()


def test_probe_cli_on_a_store_from_the_tiny_encoder(tiny_encoder_dir, tmp_path):
    from prefill_router.cli import main
    from prefill_router.features import extract_to_store, load_encoder

    rng = np.random.default_rng(0)
    prompts = [f"question {i}: " + ("the quick fox " if i % 2 else "lazy dog ") * (1 + i % 4) for i in range(40)]
    lines = ["prompt_id,prompt,target,score"]
    for i, p in enumerate(prompts):
        lines.append(f"q{i},{p},a,{i % 2}")
        lines.append(f"q{i},{p},b,{int(rng.random() < 0.5)}")
    data = tmp_path / "labels.csv"
    data.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store"
    extract_to_store(prompts, load_encoder(str(tiny_encoder_dir)), store, poolings=("mean", "last"),
                     progress=False)
    out = tmp_path / "probes"
    assert main(["probe", "--features", str(store), "--dataset", str(data), "--components", "4",
                 "--probe-pca", "4", "--out", str(out)]) == 0
    with open(out / "probes.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["pooling"] for r in rows} == {"mean", "last"}
    assert {r["target"] for r in rows} == {"a", "b"}
    assert len(rows) == 2 * 3 * 2                       # poolings x hidden states (embeddings + 2 layers) x targets
    assert (out / "probes.png").is_file()
    assert main(["probe", "--features", str(tmp_path / "missing"), "--dataset", str(data),
                 "--out", str(out)]) == 2


def test_probe_and_train_read_store_rows_by_prompt_hash(tiny_encoder_dir, tmp_path):
    """A store whose rows are in another order than the dataset's (extracted for a reordered or larger prompt
    list) gives the same probes and the same router as a store in dataset order."""
    from prefill_router.cli import main
    from prefill_router.features import extract_to_store, load_encoder
    from prefill_router.router import Router

    rng = np.random.default_rng(1)
    prompts = [f"item {i}: " + ("the quick fox " if i % 2 else "lazy dog ") * (1 + i % 5) for i in range(36)]
    lines = ["prompt_id,prompt,target,score"]
    for i, p in enumerate(prompts):
        lines += [f"q{i},{p},a,{i % 2}", f"q{i},{p},b,{int(rng.random() < 0.5)}"]
    data = tmp_path / "labels.csv"
    data.write_text("\n".join(lines) + "\n")
    encoder = load_encoder(str(tiny_encoder_dir))
    extra = ["a prompt the dataset does not have", "another one"]
    stores = {"ordered": prompts, "shuffled": extra + prompts[::-1]}
    for name, rows in stores.items():
        extract_to_store(rows, encoder, tmp_path / name, poolings=("mean",), progress=False)

    tables, routers = {}, {}
    for name in stores:
        assert main(["probe", "--features", str(tmp_path / name), "--dataset", str(data), "--components", "4",
                     "--probe-pca", "4", "--out", str(tmp_path / f"probes-{name}")]) == 0
        with open(tmp_path / f"probes-{name}" / "probes.csv") as f:
            tables[name] = {(r["pooling"], r["hidden_state"], r["target"]): r for r in csv.DictReader(f)}
        assert main(["train", "--dataset", str(data), "--features", str(tmp_path / name), "--pca", "4",
                     "--seeds", "2", "--keep", "1", "--holdout", "0", "--out", str(tmp_path / f"router-{name}")]) == 0
        routers[name] = Router.load(tmp_path / f"router-{name}")
    assert tables["ordered"].keys() == tables["shuffled"].keys()
    for key, row in tables["ordered"].items():
        for column in ("fisher_j", "d_eff"):  # order-free statistics of the same rows and labels
            assert float(tables["shuffled"][key][column]) == pytest.approx(float(row[column]), rel=1e-4)
    X = np.random.default_rng(2).normal(size=(5, *routers["ordered"].transform.input_shape)).astype(np.float32)
    np.testing.assert_allclose(routers["shuffled"].predict_proba_features(X),
                               routers["ordered"].predict_proba_features(X), rtol=1e-5, atol=1e-6)

    # A dataset prompt that the store lacks is named, not silently misaligned.
    extract_to_store(prompts[:-1], encoder, tmp_path / "short", poolings=("mean",), progress=False)
    assert main(["train", "--dataset", str(data), "--features", str(tmp_path / "short"),
                 "--out", str(tmp_path / "router-short")]) == 2


def test_an_outlier_dimension_is_named_and_the_standardized_probes_see_past_it():
    """One huge, label-free dimension (a 'massive activation') owns the raw covariance: raw d_eff is about 1,
    and raw J is crushed because the shrinkage target (trace / p) is the outlier's variance. The outlier is
    named; standardized and clean probes recover the spread and the separation."""
    rng = np.random.default_rng(0)
    n, d = 2000, 12
    y = rng.random(n) < 0.5
    X = rng.normal(size=(n, d))
    X[y, 1] += 1.0                            # the signal, in an ordinary dimension
    X[:, 7] = rng.normal(0, 1000.0, n)         # the outlier: huge and uninformative
    report = probe_layer(X, y[:, None].astype(float), ["t"], pooling="mean", hidden_state=0,
                         n_components=None, with_auc=False)
    assert report.outliers == [7]
    assert report.d_eff < 1.1 and report.d_eff_std > 5 and report.d_eff_clean > 5
    assert report.fisher_j["t"] < 0.05 < 0.5 < report.fisher_j_std["t"]
    assert report.fisher_j_clean["t"] > 0.5
    assert outlier_dimensions(rng.normal(size=(500, 8))).size == 0  # isotropic data has none
    assert select_layers([report], "j_std") == [0]
    with pytest.raises(ConfigError, match="j_std"):
        select_layers([report], "jj")
