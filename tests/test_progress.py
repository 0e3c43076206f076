"""Progress that estimates honestly: the encoder's bar counts tokens (its batches run longest first), and
training shows one bar over every network fit, announced step by step, with an estimate after the first fit.
`train --fast` trains fewer seeds on fewer folds."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from prefill_router import progress
from prefill_router.cli import build_parser
from prefill_router.cli.train import _training_sizes
from prefill_router.data import CostModel, PriceTable, RoutingDataset
from prefill_router.features import encoder as encoder_module
from prefill_router.features import load_encoder
from prefill_router.router import train as train_module
from prefill_router.router import train_router

TARGETS = ["big", "small", "mid"]
PRICES = {"big": (10.0, 30.0), "small": (0.1, 0.3), "mid": (1.0, 3.0)}
SMALL = {"pca": 6, "calibration_folds": 3, "calibration_seeds": 2,
         "trunk": {"seeds": 3, "keep": 2, "max_epochs": 5, "patience": 3, "batch_size": 32, "threads": 1}}


class RecordingTokenBar(progress.TokenBar):
    made: list[RecordingTokenBar] = []

    def __init__(self, total_tokens: int, prompts: int, **kwargs):
        super().__init__(total_tokens, prompts, **kwargs)
        self.total_tokens, self.batches = total_tokens, []
        RecordingTokenBar.made.append(self)

    def advance(self, tokens: int, prompts: int) -> None:
        self.batches.append((tokens, prompts))
        super().advance(tokens, prompts)


class RecordingWorkBar(progress.WorkBar):
    made: list[RecordingWorkBar] = []

    def __init__(self, steps, **kwargs):
        super().__init__(steps, **kwargs)
        self.started, self.fitted_rows = [], []
        RecordingWorkBar.made.append(self)

    def step(self, key: str) -> None:
        self.started.append(key)
        super().step(key)

    def fitted(self, rows: int, seconds: float) -> None:
        self.fitted_rows.append(rows)
        super().fitted(rows, seconds)


def test_the_prefill_bar_counts_every_token_once_and_the_prompts_beside_them(tiny_encoder_dir, monkeypatch, capsys):
    RecordingTokenBar.made.clear()
    monkeypatch.setattr(encoder_module, "TokenBar", RecordingTokenBar)
    encoder = load_encoder(str(tiny_encoder_dir))
    prompts = [f"question {i}: " + "words " * (2 * i) for i in range(9)]  # all within the 128-token context
    encoder.encode(prompts, poolings=["mean"], batch_tokens=160, progress=True)
    (bar,) = RecordingTokenBar.made
    lengths = encoder.count_tokens(prompts)
    assert bar.total_tokens == lengths.sum()
    assert sum(t for t, _ in bar.batches) == lengths.sum() and sum(p for _, p in bar.batches) == len(prompts)
    # longest first: the first batch holds few prompts but a large share of the tokens
    first_tokens, first_prompts = bar.batches[0]
    assert first_tokens / lengths.sum() > first_prompts / len(prompts)
    shown = capsys.readouterr().err
    assert f"{lengths.sum()}/{lengths.sum()}" in shown and f"{len(prompts)}/{len(prompts)} prompts" in shown


def _dataset(n: int, seed: int = 0, costs: bool = True):
    rng = np.random.default_rng(seed)
    Y = np.stack([rng.random(n) < 0.8, rng.random(n) < 0.4, rng.random(n) < 0.6], axis=1).astype(float)
    C = np.tile([3e-3, 3e-5, 3e-4], (n, 1)) if costs else np.full((n, 3), np.nan)  # no costs: nothing to trade
    return RoutingDataset([str(i) for i in range(n)], [f"prompt {i}" for i in range(n)], TARGETS, Y, C)


@pytest.mark.parametrize("layers,prices,steps", [
    ("all", True, ["transform", "ensemble", "policy"]),
    ("auto", True, ["layers", "transform", "ensemble", "policy"]),
    ("all", False, ["transform", "ensemble"]),  # no prices: argmax, nothing to cross-fit
])
def test_the_training_bar_covers_exactly_the_work_it_announced(layers, prices, steps, monkeypatch, capsys):
    RecordingWorkBar.made.clear()
    monkeypatch.setattr(train_module, "WorkBar", RecordingWorkBar)
    X = np.random.default_rng(1).normal(size=(90, 3, 8)).astype(np.float32)
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([40.0, 40.0, 40.0])) if prices else None
    with contextlib.nullcontext() if prices else pytest.warns(UserWarning, match="without prices"):
        train_router(_dataset(90, costs=prices), X, np.arange(80), {**SMALL, "layers": layers},
                     hidden_states=[0, 6, 12], cost_model=cost_model, progress=True)
    (bar,) = RecordingWorkBar.made
    assert [s.key for s in bar.steps] == steps and bar.started == steps
    assert sum(bar.fitted_rows) == bar.total > 0  # the plan's arithmetic matches the fits that ran
    shown = capsys.readouterr().err
    assert "training a router on 80 prompts x 3 targets" in shown
    assert shown.count("estimate: about") == 1 and "to go on this machine" in shown
    assert f"step {len(steps)}/{len(steps)}" in shown


def test_without_progress_training_prints_nothing(capsys):
    X = np.random.default_rng(1).normal(size=(60, 3, 8)).astype(np.float32)
    cost_model = CostModel(PriceTable(PRICES), TARGETS, np.array([40.0, 40.0, 40.0]))
    train_router(_dataset(60), X, None, SMALL, hidden_states=[0, 6, 12], cost_model=cost_model)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("flags,sizes", [
    ([], (10, 5, 3)),
    (["--fast"], (3, 3, 2)),
    (["--fast", "--seeds", "4"], (4, 3, 2)),
    (["--fast", "--calibration-folds", "3"], (3, 3, 3)),
    (["--seeds", "3"], (3, 3, 3)),  # fewer seeds alone keeps them all rather than failing on keep 5
    (["--seeds", "20", "--keep", "8"], (20, 8, 3)),
])
def test_fast_trains_fewer_seeds_on_fewer_folds_and_given_options_win(flags, sizes):
    args = build_parser().parse_args(["train", *flags, "--out", "unused"])
    assert _training_sizes(args) == sizes
