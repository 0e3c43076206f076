"""Training time of the SharedTrunkNet ensemble and routing latency per prompt, each next to a naive baseline.

    .venv/bin/python bench/train.py                      # 10 seeds on 12,000 x 200, SmolLM2 encoder, 64 prompts
    .venv/bin/python bench/train.py --seeds 3 --prompts 32

Training: the same network, loss, optimiser, batch size and early stopping, trained (a) our way, full-batch
tensors indexed by a random permutation, and (b) the naive way, a torch DataLoader over a TensorDataset with
shuffle. Data: 12,000 x 200 synthetic features with 28 logistic targets (labels 10% missing).
Routing: SmolLM2-135M over MMLU-Pro questions, mean pooling at hidden states 0,6,12,18,24,30, PCA 200 and the
kept members of the ensemble above. Medians over prompts of: encoder prefill, transform, MLP, policy, and
the whole `route()`; and per prompt when 16 prompts go through one `route_batch()` (naive: 16 `route()` calls).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefill_router.router.checkpoint import Router
from prefill_router.router.transform import FeatureTransform
from prefill_router.router.trunk import SharedTrunkNet, TrunkConfig, TrunkEnsemble, masked_bce, split_labels


def synthetic(n: int, d: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    W = rng.normal(size=(d, k)) / np.sqrt(d) * 1.5
    Y = (rng.random((n, k)) < 1 / (1 + np.exp(-X @ W))).astype(np.float64)
    Y[rng.random((n, k)) < 0.1] = np.nan
    return X, Y


def naive_fit(X: np.ndarray, Y: np.ndarray, cfg: TrunkConfig) -> list[float]:
    """The same training with a DataLoader, as most tutorials write it. Returns best val loss per seed."""
    from torch.utils.data import DataLoader, TensorDataset

    targets, mask = split_labels(Y)
    order = np.random.default_rng(cfg.seed).permutation(len(X))
    n_val = int(round(cfg.val_fraction * len(X)))
    val, train = order[:n_val], order[n_val:]
    tr = TensorDataset(torch.from_numpy(X[train]), torch.from_numpy(targets[train]), torch.from_numpy(mask[train]))
    xv, yv, mv = (torch.from_numpy(a[val]) for a in (X, targets, mask))
    losses = []
    for s in range(cfg.seeds):
        torch.manual_seed(cfg.seed + s)
        net = SharedTrunkNet(X.shape[1], Y.shape[1], cfg.hidden, cfg.dropout)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        loader = DataLoader(tr, batch_size=cfg.batch_size, shuffle=True)
        best, stale = float("inf"), 0
        for _ in range(cfg.max_epochs):
            net.train()
            for xb, yb, mb in loader:
                loss = masked_bce(net(xb), yb, mb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                v = float(masked_bce(net(xv), yv, mv))
            if v < best:
                best, stale = v, 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        losses.append(best)
    return losses


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--dims", type=int, default=200)
    ap.add_argument("--targets", type=int, default=28)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--encoder", default="smollm2-135m", help="encoder for the latency part ('none' skips it)")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    X, Y = synthetic(args.rows, args.dims, args.targets)
    cfg = TrunkConfig(seeds=args.seeds, keep=min(args.keep, args.seeds), threads=args.threads)
    start = time.perf_counter()
    ensemble = TrunkEnsemble(cfg).fit(X, Y)
    ours_s = time.perf_counter() - start
    naive_s = float("nan")
    if not args.skip_naive:
        start = time.perf_counter()
        naive_losses = naive_fit(X, Y, cfg)
        naive_s = time.perf_counter() - start
        print(f"val loss (ours, all seeds): {np.round(ensemble.all_val_losses, 4).tolist()}")
        print(f"val loss (naive, all seeds): {np.round(naive_losses, 4).tolist()}")
    print(f"epochs to best per seed (ours): {ensemble.epochs}")

    rows = [(f"ensemble training, {args.seeds} seeds on {args.rows} x {args.dims}, {args.targets} targets (s)",
             ours_s, naive_s)]
    if args.encoder != "none":
        from prefill_router.data import load_mmlu_pro
        from prefill_router.features import load_encoder

        encoder = load_encoder(args.encoder)
        states = [0, 6, 12, 18, 24, 30] if encoder.num_hidden_states >= 31 else list(range(encoder.num_hidden_states))
        prompts = load_mmlu_pro(args.data_root, limit=args.prompts).prompts
        feats = encoder.encode(prompts, poolings=("mean",), layers=states)["mean"]
        # A transform of the right shape; the fitted PCA values do not change the timing.
        rng = np.random.default_rng(0)
        noise = rng.normal(size=(400,) + feats.shape[1:]).astype(np.float32)
        fit_rows = feats[rng.integers(0, len(feats), 400)] + noise
        transform = FeatureTransform(dims=args.dims).fit(fit_rows)
        router = Router(targets=[f"t{k}" for k in range(args.targets)], transform=transform, predictor=ensemble,
                        pooling="mean", hidden_states=states, encoder_identity=None, policy="argmax",
                        encoder=encoder)
        enc_t, tr_t, mlp_t, pol_t, route_t = [], [], [], [], []
        C = np.ones((1, args.targets))
        router.route(prompts[0])  # warm-up
        for p in prompts:
            t0 = time.perf_counter()
            x = encoder.encode([p], poolings=("mean",), layers=states)["mean"]
            t1 = time.perf_counter()
            z = router.transform.transform(x)
            t_mid = time.perf_counter()
            P = router.predictor.predict_proba(z)
            t2 = time.perf_counter()
            router.choose(P, C)
            t3 = time.perf_counter()
            router.route(p)
            t4 = time.perf_counter()
            enc_t.append(t1 - t0)
            tr_t.append(t_mid - t1)
            mlp_t.append(t2 - t_mid)
            pol_t.append(t3 - t2)
            route_t.append(t4 - t3)
        batch_t, single_t = [], []
        for i in range(0, len(prompts) - 15, 16):
            chunk = prompts[i:i + 16]
            t0 = time.perf_counter()
            router.route_batch(chunk)
            t1 = time.perf_counter()
            for p in chunk:
                router.route(p)
            t2 = time.perf_counter()
            batch_t.append((t1 - t0) / len(chunk))
            single_t.append((t2 - t1) / len(chunk))
        rows += [("encoder prefill per prompt, median (ms)", median_ms(enc_t), float("nan")),
                 (f"transform (scaler + PCA {args.dims} of {x.size}) per prompt, median (ms)",
                  median_ms(tr_t), float("nan")),
                 (f"MLP ({len(ensemble.members)} members) per prompt, median (ms)", median_ms(mlp_t),
                  float("nan")),
                 ("policy per prompt, median (ms)", median_ms(pol_t), float("nan")),
                 ("route() per prompt, median (ms)", median_ms(route_t), float("nan"))]
        if batch_t:
            rows.append(("per prompt: route_batch(16) vs 16 x route(), median (ms)", median_ms(batch_t),
                         median_ms(single_t)))

    print()
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    print("| measurement | ours | naive | naive / ours |")
    print("|---|---:|---:|---:|")
    for name, ours, naive in rows:
        ratio = f"{naive / ours:.2f}x" if np.isfinite(naive) and ours > 0 else "—"
        naive_txt = f"{naive:.3f}" if np.isfinite(naive) else "—"
        print(f"| {name} | {ours:.3f} | {naive_txt} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
