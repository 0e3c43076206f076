"""The examples in docs/data-formats.md are read by the real readers as the text says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from prefill_router.data.prices import PriceTable
from prefill_router.data.readers import read_routing_data
from prefill_router.errors import DataError

DOC = Path(__file__).resolve().parents[1] / "docs" / "data-formats.md"


def blocks() -> list[tuple[str, str]]:
    """The data examples (commands in `bash` blocks are not files)."""
    return [(kind, text) for kind, text in re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
            if kind != "bash"]


def test_the_documented_examples_read_as_described(tmp_path):
    found = blocks()
    assert [kind for kind, _ in found] == ["csv", "csv", "json", "csv", "yaml", "yaml"]
    (long_csv, wide_csv, jsonl, prices_csv, prices_yaml, prices_list) = (text for _, text in found)
    files = {}
    for name, text in [("long.csv", long_csv), ("wide.csv", wide_csv), ("chat.jsonl", jsonl),
                       ("prices.csv", prices_csv), ("prices.yaml", prices_yaml), ("rows.yaml", prices_list)]:
        files[name] = tmp_path / name
        files[name].write_text(text)

    long, wide = read_routing_data(files["long.csv"]), read_routing_data(files["wide.csv"])
    assert long.targets == wide.targets == ["big-model", "small-model"]
    np.testing.assert_array_equal(long.Y, wide.Y)
    np.testing.assert_array_equal(long.Y, [[1, 0], [1, 1]])
    chat = read_routing_data(files["chat.jsonl"])
    assert chat.prompts[0] == [{"role": "user", "content": "What is 17 * 23?"}]
    np.testing.assert_array_equal(chat.Y, [[1, 0], [1, 1]])  # true reads as 1
    assert np.isnan(long.C).all()  # neither costs nor prices: costs unknown

    tables = [PriceTable.load(files[n]).to_dict() for n in ("prices.csv", "prices.yaml", "rows.yaml")]
    assert tables[0] == tables[1] == tables[2]
    assert tables[0]["big-model"] == {"usd_per_m_input": 2.5, "usd_per_m_output": 10.0}
    priced = read_routing_data(files["long.csv"], prices=files["prices.yaml"])
    assert np.isfinite(priced.C).all() and (priced.C[:, 0] > priced.C[:, 1]).all()

    (tmp_path / "prices.toml").write_text("x = 1\n")
    with pytest.raises(DataError, match="unsupported price file type"):
        PriceTable.load(tmp_path / "prices.toml")
