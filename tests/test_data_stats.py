"""dataset_stats on a small dataset whose every figure is computed by hand below."""

from __future__ import annotations

import numpy as np
import pytest

from prefill_router.data import RoutingDataset, dataset_stats, format_stats

nan = np.nan


def test_stats_by_hand():
    # targets: cheap, mid, dear. Row 3: nobody correct. Row 4: cheap not run. Row 5: no target run at all.
    Y = np.array([[1, 1, 1],
                  [0, 1, 1],
                  [0, 0, 1],
                  [0, 0, 0],
                  [nan, 1, 0],
                  [nan, nan, nan]])
    C = np.array([[1, 2, 9],
                  [1, 3, 9],
                  [1, 2, 8],
                  [2, 1, 9],
                  [nan, 4, 9],
                  [nan, nan, nan]], dtype=float)
    ds = RoutingDataset([str(i) for i in range(6)], [f"p{i}" for i in range(6)], ["cheap", "mid", "dear"],
                        Y, C, groups=["x", "x", "y", "y", "y", "x"])
    s = dataset_stats(ds)
    cheap, mid, dear = (s["per_target"][t] for t in ("cheap", "mid", "dear"))
    assert cheap["accuracy"] == pytest.approx(1 / 4) and cheap["coverage"] == pytest.approx(4 / 6)
    assert mid["accuracy"] == pytest.approx(3 / 5) and dear["accuracy"] == pytest.approx(3 / 5)
    assert cheap["mean_cost"] == pytest.approx(5 / 4)
    assert dear["mean_cost"] == pytest.approx(44 / 5)
    # oracle over the 5 rows with any score: correct on rows 0, 1, 2, 4
    assert s["oracle_accuracy"] == pytest.approx(4 / 5)
    assert s["prompts_without_scores"] == 1
    # cheapest correct: 1 (cheap), 3 (mid), 8 (dear), none correct -> cheapest overall 1 (mid), 4 (mid)
    assert s["oracle_cost"] == pytest.approx((1 + 3 + 8 + 1 + 4) / 5)
    # mid and dear tie at 3/5; the first one listed wins
    assert s["best_single"] == "mid" and s["most_expensive"] == "dear"
    # agreement cheap vs mid over rows 0-3: same on 0, 2, 3 -> 3/4; mid vs dear over rows 0-4: 0,1,3 -> 3/5
    assert s["agreement"][0][1] == pytest.approx(3 / 4)
    assert s["agreement"][1][2] == pytest.approx(3 / 5) and s["agreement"][2][1] == s["agreement"][1][2]
    assert s["agreement"][0][0] == 1.0
    assert s["groups"] == {"x": 3, "y": 3}
    text = format_stats(s)
    assert "best single:     mid" in text and "0.8000" in text
