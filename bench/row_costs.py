"""Per-row costs instead of a price table: does a router trained on a file's own costs save as much?

Writes shipped MMLU-Pro rows (a seeded category-stratified sample of the questions the SmolLM2 reference
features hold) as one long-format CSV: prompt_id, prompt, target, score, category, split, cost (each row's cost
computed from the shipped prices, models.csv: input tokens x input price + the recorded output tokens x output
price, a target's median output length where none was recorded), input_tokens and output_tokens. Then `train`
runs twice on that file, with the same features, split and settings:

- `row costs`: without a price table; the cost model is each target's mean cost over the training rows;
- `price table`: with `--prices models.csv`; the cost model prices each prompt from its token count.

Each router is scored on the file's held-out prompts (`--split-col split`) against their real per-row costs:
accuracy, USD per 1,000 queries, savings against always calling the most expensive target (the design's
definition) and against always calling the best single target (chosen on the training rows).

    .venv/bin/python bench/row_costs.py                      # 2,000 prompts, 25 % held out, 3 seeds
    .venv/bin/python bench/row_costs.py --rows 4000 --seeds 5

Features: the SmolLM2-135M reference features (../shared/data, imported into a temporary store). Without them,
`--features STORE` names a store that `prefill-router extract --dataset mmlu-pro` wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from prefill_router.cli import main as cli  # noqa: E402
from prefill_router.data import find_reference_features, load_mmlu_pro, stratified_sample  # noqa: E402
from prefill_router.data.builtin import data_root  # noqa: E402
from prefill_router.data.splits import train_test_split  # noqa: E402
from prefill_router.features import FeatureSet  # noqa: E402
from prefill_router.features.reference import import_reference  # noqa: E402
from prefill_router.router import Router  # noqa: E402
from prefill_router.utils import markdown_table  # noqa: E402


def cpu_and_load() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPUs, load average {load}"


def write_long_file(path: Path, rows: np.ndarray, test: np.ndarray, ds) -> None:
    """The sampled rows of `ds` in the long layout, one line per (prompt, target) that was run."""
    is_test = np.isin(rows, test)
    records = []
    for r, held in zip(rows, is_test):
        for k, target in enumerate(ds.targets):
            if np.isnan(ds.Y[r, k]):
                continue
            out = ds.output_tokens[r, k]
            records.append({"prompt_id": ds.prompt_ids[r], "prompt": ds.prompts[r], "target": target,
                            "score": int(ds.Y[r, k]), "category": ds.groups[r], "split": "test" if held else "train",
                            "cost": repr(float(ds.C[r, k])), "input_tokens": int(ds.input_tokens[r]),
                            "output_tokens": "" if np.isnan(out) else int(out)})
    pd.DataFrame(records).to_csv(path, index=False)


def train(data: Path, store: Path, out: Path, args, *extra: str) -> tuple[Router, float]:
    argv = ["train", "--dataset", str(data), "--features", str(store), "--split-col", "split",
            "--layers", args.layers, "--pca", str(args.pca), "--seeds", str(args.seeds), "--keep", str(args.keep),
            "--calibration-folds", "3", "--threads", str(args.threads), "--out", str(out), *extra]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if cli(argv) != 0:
            raise SystemExit(f"train failed: {' '.join(argv)}")
    return Router.load(out), time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="questions sampled (among those with features)")
    p.add_argument("--test", type=float, default=0.25, help="share held out")
    p.add_argument("--features", help="feature store of MMLU-Pro (default: import the reference features)")
    p.add_argument("--layers", default="12,18", help="hidden states the routers read")
    p.add_argument("--pca", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(f"machine: {cpu_and_load()}", file=sys.stderr)

    ds = load_mmlu_pro(None)
    with tempfile.TemporaryDirectory(prefix="row-costs-") as tmp:
        tmp_path = Path(tmp)
        if args.features:
            store = Path(args.features)
        else:
            reference = find_reference_features()
            if reference is None:
                raise SystemExit("no reference features found (../shared/data); pass --features STORE")
            store = tmp_path / "store"
            import_reference(reference, store, prompts=ds.prompts)
        fs = FeatureSet.open(store)
        held = np.asarray(fs.done, dtype=bool)[fs.rows_of(ds.prompts, missing_ok=True)]
        with_features = ds.subset(np.flatnonzero(held))
        sample = stratified_sample(with_features, args.rows, seed=0)
        sub = with_features.subset(sample)
        _, test = train_test_split(sub, test_size=args.test, seed=0)
        data = tmp_path / "mmlu-pro-long.csv"
        write_long_file(data, np.arange(sub.n), test, sub)

        results = []
        for name, extra in (("row costs (no price table)", ()),
                            ("price table", ("--prices", str(data_root() / "mmlu-pro" / "models.csv")))):
            router, seconds = train(data, store, tmp_path / name.split()[0], args, *extra)
            results.append((name, router, seconds))

    test_mask = np.zeros(sub.n, dtype=bool)
    test_mask[test] = True
    train_rows = np.flatnonzero(~test_mask)
    dearest = int(np.nanargmax(np.nanmean(sub.C[train_rows], axis=0)))
    always_dearest = 1000 * float(np.nanmean(sub.C[test, dearest]))
    table = []
    for name, router, seconds in results:
        h = router.metrics["holdout"]
        cost = h["cost_per_1k_default_policy"]
        table.append([name, router.default_policy, f"{h['accuracy_default_policy']:.2%}",
                      f"{h['best_single_accuracy']:.2%}", f"${cost:.4f}",
                      f"{1 - cost / always_dearest:.1%}", f"{1 - cost / h['best_single_cost_per_1k']:.1%}",
                      f"{seconds:.0f}"])
    print(f"MMLU-Pro, {sub.n} questions x {sub.k} targets ({sub.n - test.size} train, {test.size} held out), "
          f"SmolLM2-135M mean pooling at hidden states {args.layers}, PCA {args.pca}, {args.seeds} seeds "
          f"(keep {args.keep}); savings on the held-out prompts' own costs; most expensive target: "
          f"{sub.targets[dearest]} (${always_dearest:.4f} / 1k there)")
    print()
    print("\n".join(markdown_table(
        ["cost model", "default policy", "held-out accuracy", "best single there", "USD / 1k",
         "savings vs most expensive", "savings vs best single", "train s"], table)))
    print(f"\nmachine after: {cpu_and_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
