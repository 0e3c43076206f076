"""Token prices per target, and the cost model that turns token counts into USD per (prompt, target).

Cost of one call = input_tokens * usd_per_m_input / 1e6 + output_tokens * usd_per_m_output / 1e6 + usd_per_call.
The output length is unknown before a call, so the cost model stands in each target's median output length,
computed over training rows only (so the test split never leaks into cost estimates).

Data with its own per-row costs and no price table gets a cost model too (`CostModel.from_row_costs`): each
target costs its mean known cost over the training rows, a fixed price per call.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prefill_router.errors import ConfigError, DataError

if TYPE_CHECKING:
    from prefill_router.data.dataset import RoutingDataset

# Every note about how C was computed starts with this, so that recomputing C can replace those notes.
COST_NOTE_PREFIX = "cost: "


@dataclass(frozen=True)
class Price:
    usd_per_m_input: float
    usd_per_m_output: float
    usd_per_call: float = 0.0  # a fixed cost per call (the mean of per-row costs when no token prices are known)


def _price_value(value, *, file, line, field_name) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"price {value!r} is not a number", file=file, line=line, field=field_name) from None
    if not math.isfinite(number) or number < 0:
        raise DataError(f"price {value!r} must be a finite number >= 0", file=file, line=line,
                        field=field_name)
    return number


class PriceTable:
    """USD per million input and output tokens, per target name."""

    def __init__(self, prices: Mapping[str, Price | tuple[float, float]], source: str | None = None):
        self.prices: dict[str, Price] = {name: p if isinstance(p, Price) else Price(float(p[0]), float(p[1]))
                                         for name, p in prices.items()}
        self.source = source

    # ---- reading ----
    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """Read a YAML (`target: {usd_per_m_input: .., usd_per_m_output: ..}` or a list of such rows) or CSV
        (`target, usd_per_m_input, usd_per_m_output`; a `model` column is accepted for `target`)."""
        path = Path(path)
        if not path.is_file():
            raise DataError("price file not found", file=str(path))
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return cls._load_yaml(path)
        if suffix == ".csv":
            return cls._load_csv(path)
        raise DataError(f"unsupported price file type '{suffix}' (use .yaml, .yml or .csv)", file=str(path))

    @classmethod
    def _load_csv(cls, path: Path) -> PriceTable:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            name_col = "target" if "target" in columns else "model" if "model" in columns else None
            for needed in (name_col or "target", "usd_per_m_input", "usd_per_m_output"):
                if needed not in columns:
                    raise DataError(f"missing column (found {columns})", file=str(path), line=1, field=needed)
            rows = [(line, row) for line, row in enumerate(reader, start=2)]
        return cls._from_rows(((line, row[name_col], row["usd_per_m_input"], row["usd_per_m_output"])
                               for line, row in rows), str(path))

    @classmethod
    def _load_yaml(cls, path: Path) -> PriceTable:
        import yaml

        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise DataError(f"invalid YAML: {exc}", file=str(path),
                            line=None if mark is None else mark.line + 1) from None
        if isinstance(doc, dict) and "prices" in doc:
            doc = doc["prices"]
        rows = []
        if isinstance(doc, dict):
            for name, entry in doc.items():
                if not isinstance(entry, dict):
                    raise DataError("expected a mapping with usd_per_m_input and usd_per_m_output",
                                    file=str(path), field=str(name))
                rows.append((name, entry))
        elif isinstance(doc, list):
            for i, entry in enumerate(doc):
                if not isinstance(entry, dict) or not ("target" in entry or "model" in entry):
                    raise DataError(f"entry {i + 1} needs a 'target' name", file=str(path), field="target")
                rows.append((entry.get("target", entry.get("model")), entry))
        else:
            raise DataError("expected a mapping of target -> prices or a list of rows", file=str(path))
        for name, entry in rows:
            for needed in ("usd_per_m_input", "usd_per_m_output"):
                if needed not in entry:
                    raise DataError(f"target '{name}' has no {needed}", file=str(path), field=needed)
        return cls._from_rows(((None, name, e["usd_per_m_input"], e["usd_per_m_output"]) for name, e in rows),
                              str(path))

    @classmethod
    def _from_rows(cls, rows: Iterable[tuple], source: str) -> PriceTable:
        prices: dict[str, Price] = {}
        for line, name, p_in, p_out in rows:
            name = str(name).strip() if name is not None else ""
            if not name:
                raise DataError("empty target name", file=source, line=line, field="target")
            if name in prices:
                raise DataError(f"target '{name}' is priced twice", file=source, line=line, field="target")
            prices[name] = Price(_price_value(p_in, file=source, line=line, field_name="usd_per_m_input"),
                                 _price_value(p_out, file=source, line=line, field_name="usd_per_m_output"))
        if not prices:
            raise DataError("no prices found", file=source)
        return cls(prices, source)

    # ---- use ----
    @property
    def targets(self) -> list[str]:
        return list(self.prices)

    def __contains__(self, target: str) -> bool:
        return target in self.prices

    def __getitem__(self, target: str) -> Price:
        try:
            return self.prices[target]
        except KeyError:
            where = f" ({self.source})" if self.source else ""
            raise DataError(f"unknown target '{target}' in the price table{where}; known: {self.targets}",
                            field="target") from None

    def cost(self, target: str, input_tokens, output_tokens):
        """USD for one call (or element-wise for arrays of token counts)."""
        price = self[target]
        return (np.asarray(input_tokens, dtype=np.float64) * price.usd_per_m_input
                + np.asarray(output_tokens, dtype=np.float64) * price.usd_per_m_output) / 1e6 + price.usd_per_call

    def to_dict(self) -> dict:
        return {name: {"usd_per_m_input": p.usd_per_m_input, "usd_per_m_output": p.usd_per_m_output,
                       **({"usd_per_call": p.usd_per_call} if p.usd_per_call else {})}
                for name, p in self.prices.items()}

    @classmethod
    def from_dict(cls, data: Mapping, source: str | None = None) -> PriceTable:
        table = cls._from_rows(((None, name, e["usd_per_m_input"], e["usd_per_m_output"])
                                for name, e in data.items()), source or "price table")
        for name, e in data.items():
            if e.get("usd_per_call"):
                per_call = _price_value(e["usd_per_call"], file=table.source, line=None, field_name="usd_per_call")
                table.prices[str(name).strip()] = replace(table.prices[str(name).strip()], usd_per_call=per_call)
        return table

    def __repr__(self) -> str:
        return f"PriceTable({len(self.prices)} targets, source={self.source!r})"


@dataclass
class CostModel:
    """Prices plus a median output length per target, to estimate C[N, K] from input token counts.

    median_output_tokens[k] is the median over training rows of target k's known output lengths. A target
    with no known length in the training rows takes the median over all targets' known lengths there; when
    none is known at all it is 0, so the cost counts input tokens only. `notes` says which of these happened.
    """

    prices: PriceTable
    targets: list[str]
    median_output_tokens: np.ndarray  # [K]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.median_output_tokens = np.asarray(self.median_output_tokens, dtype=np.float64)
        if self.median_output_tokens.shape != (len(self.targets),):
            raise DataError(f"median_output_tokens has shape {self.median_output_tokens.shape}, "
                             f"expected ({len(self.targets)},)")
        for t in self.targets:
            self.prices[t]  # raises a DataError naming an unpriced target now, not at first use

    @classmethod
    def fit(cls, data: RoutingDataset | np.ndarray, train_rows: Sequence[int] | np.ndarray | None = None, *,
            prices: PriceTable | None = None, targets: Sequence[str] | None = None) -> CostModel:
        """Medians of output tokens over `train_rows` (all rows when None).

        data: a RoutingDataset (its output_tokens, targets and prices are used; `prices` overrides) or an
        output-token array [N, K] with `prices` and `targets` given.
        """
        if isinstance(data, np.ndarray) or not hasattr(data, "targets"):
            if prices is None or targets is None:
                raise ConfigError("CostModel.fit on an array needs prices= and targets=")
            output_tokens = np.asarray(data, dtype=np.float64)
            targets = list(targets)
        else:
            prices = prices or data.prices
            if prices is None:
                raise DataError("the dataset carries no price table; pass prices=", field="prices")
            targets = list(data.targets)
            output_tokens = (np.full((data.n, data.k), np.nan) if data.output_tokens is None
                             else data.output_tokens)
        if output_tokens.ndim != 2 or output_tokens.shape[1] != len(targets):
            raise DataError(f"output tokens have shape {output_tokens.shape}, expected (N, {len(targets)})")
        rows = np.arange(len(output_tokens)) if train_rows is None else np.asarray(train_rows)
        scope = "all rows" if train_rows is None else f"{len(rows)} training rows"
        known = output_tokens[rows]
        medians = np.full(len(targets), np.nan)
        for k in range(len(targets)):
            column = known[:, k][np.isfinite(known[:, k])]
            if column.size:
                medians[k] = np.median(column)
        notes = []
        missing = np.isnan(medians)
        if np.isfinite(known).any():
            measured = [t for t, m in zip(targets, missing) if not m]
            notes.append(f"{COST_NOTE_PREFIX}unknown output lengths take each target's median output tokens "
                         f"over {scope} (measured for {len(measured)} of {len(targets)} targets)")
            if missing.any():
                pooled = float(np.median(known[np.isfinite(known)]))
                medians[missing] = pooled
                notes.append(f"{COST_NOTE_PREFIX}{int(missing.sum())} target(s) have no known output length; "
                             f"they take the median over all targets' known lengths ({pooled:.0f} tokens)")
        else:
            medians[:] = 0.0
            notes.append(f"{COST_NOTE_PREFIX}no output lengths are known, so costs count input tokens only")
        return cls(prices, targets, medians, notes)

    @classmethod
    def from_row_costs(cls, data: RoutingDataset, train_rows: Sequence[int] | np.ndarray | None = None) -> CostModel:
        """Each target's mean known cost (data.C) over `train_rows` (all rows when None), as a price per call: the
        cost model of data that carries its own costs and no price table. A target without a known cost there
        is a DataError naming it (it would look free to the policy)."""
        rows = np.arange(data.n) if train_rows is None else np.asarray(train_rows)
        C = np.asarray(data.C, dtype=np.float64)[rows]
        known = np.isfinite(C)
        unpriced = [t for t, any_known in zip(data.targets, known.any(axis=0)) if not any_known]
        if unpriced:
            raise DataError(f"no known cost for target(s) {unpriced} in the {len(rows)} training rows; give their "
                            "costs or a price table", field="cost")
        means = np.where(known, C, 0.0).sum(axis=0) / known.sum(axis=0)
        source = f"mean per-row cost over {len(rows)} training rows"
        prices = PriceTable({t: Price(0.0, 0.0, float(m)) for t, m in zip(data.targets, means)}, source)
        note = (f"{COST_NOTE_PREFIX}no price table: each target costs its mean per-row cost over {len(rows)} "
                f"training rows (the data's own costs), whatever the prompt's length")
        return cls(prices, list(data.targets), np.zeros(len(data.targets)), [note])

    def estimate(self, input_tokens) -> np.ndarray:
        """C[N, K] in USD for prompts of the given token counts, with median output lengths."""
        input_tokens = np.asarray(input_tokens, dtype=np.float64).reshape(-1)
        out = np.broadcast_to(self.median_output_tokens, (len(input_tokens), len(self.targets)))
        return self._costs(input_tokens, out)

    def costs(self, data: RoutingDataset | np.ndarray,
              output_tokens: np.ndarray | None = None) -> np.ndarray:
        """C[N, K]: known output lengths where given, medians elsewhere.

        data: a RoutingDataset (uses its input_tokens, output_tokens) or input_tokens [N].
        """
        if hasattr(data, "targets"):
            if list(data.targets) != self.targets:
                raise DataError(f"dataset targets {data.targets} differ from the cost model's {self.targets}",
                                field="targets")
            if data.input_tokens is None:
                raise DataError("the dataset has no input token counts, so costs cannot be recomputed",
                                field="input_tokens")
            input_tokens, output_tokens = data.input_tokens, data.output_tokens
        else:
            input_tokens = np.asarray(data, dtype=np.float64).reshape(-1)
        out = np.broadcast_to(self.median_output_tokens, (len(input_tokens), len(self.targets)))
        if output_tokens is not None:
            output_tokens = np.asarray(output_tokens, dtype=np.float64)
            out = np.where(np.isfinite(output_tokens), output_tokens, out)
        return self._costs(np.asarray(input_tokens, dtype=np.float64), out)

    def _costs(self, input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        C = np.empty(output_tokens.shape)
        for k, t in enumerate(self.targets):
            C[:, k] = self.prices.cost(t, input_tokens, output_tokens[:, k])
        return C

    def to_dict(self) -> dict:
        """JSON-safe, for checkpoints."""
        return {"targets": list(self.targets), "prices": self.prices.to_dict(),
                "median_output_tokens": [float(x) for x in self.median_output_tokens],
                "notes": list(self.notes), "price_source": self.prices.source}

    @classmethod
    def from_dict(cls, data: Mapping) -> CostModel:
        for key in ("targets", "prices", "median_output_tokens"):
            if key not in data:
                raise DataError("cost model is missing a field", field=key)
        return cls(PriceTable.from_dict(data["prices"], data.get("price_source")), list(data["targets"]),
                   np.asarray(data["median_output_tokens"], dtype=np.float64), list(data.get("notes", [])))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
