"""Loaders for known routing datasets: MMLU-Pro (12,002 questions x 28 LLMs) and RouteLLM's GPT-4 vs Mixtral.

The data ships with the package (`prefill_router/data/shipped/`, Apache-2.0, sources in its README), so these
loaders work on a fresh clone. Another folder of the same layout (`mmlu-pro/`, `routellm/`) can be named by
the `root` argument or the PREFILL_ROUTER_DATA environment variable.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from prefill_router.data.dataset import RoutingDataset
from prefill_router.data.prices import CostModel, PriceTable
from prefill_router.data.tokens import cache_dir, count_tokens, counting_tokenizer
from prefill_router.errors import ConfigError, DataError
from prefill_router.utils import atomic_path, file_sha256

DATA_ENV = "PREFILL_ROUTER_DATA"

# MMLU-Pro records each answer's length in characters, not tokens. English text with numbers and formulas
# runs close to 4 characters per token with common LLM tokenizers, so output tokens = chars / 4 (rounded).
CHARS_PER_TOKEN = 4.0

ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTELLM_STRONG = "gpt-4-1106-preview"
# Assumed prices, USD per million tokens. gpt-4-1106-preview: OpenAI's list price ($10 input, $30 output).
# Mixtral-8x7B-Instruct: $0.24 for input and output alike, the hosted price RouteLLM's paper (Ong et al. 2024,
# arXiv 2406.18665, section 5) assumes; the same paper summarises GPT-4 as a blended $24.7 per million tokens.
ROUTELLM_PRICES = {ROUTELLM_WEAK: (0.24, 0.24), ROUTELLM_STRONG: (10.0, 30.0)}


SHIPPED_DATA = Path(__file__).resolve().parent / "shipped"
REFERENCE_FEATURES = Path("mmlu-pro") / "features-smollm2-135m"
# Where a checkout's precomputed reference features usually sit: a `shared/data` folder beside the clone.
REFERENCE_SEARCH = (Path("..") / "shared" / "data",)


def data_root(root: str | Path | None = None) -> Path:
    """The data folder: `root` if given, else $PREFILL_ROUTER_DATA, else the data shipped with the package."""
    source = "the root argument"
    if root is None:
        root, source = os.environ.get(DATA_ENV), DATA_ENV
        if not root:
            return SHIPPED_DATA
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder given by {source} does not exist (pass root= / --data-root or set "
                        f"{DATA_ENV})", file=str(path))
    return path


def find_reference_features(root: str | Path | None = None) -> Path | None:
    """The precomputed SmolLM2 reference features of MMLU-Pro, if any folder holds them: under `root`, under
    $PREFILL_ROUTER_DATA, or under `../shared/data` from the working directory. They only save encoder time."""
    candidates = [Path(r).expanduser() for r in (root, os.environ.get(DATA_ENV)) if r]
    candidates += [Path.cwd() / p for p in REFERENCE_SEARCH]
    for folder in candidates:
        if (folder / REFERENCE_FEATURES / "layout.json").is_file():
            return folder / REFERENCE_FEATURES
    return None


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError("expected data file is missing", file=str(path))
    return path


def _cached_token_counts(prompts: list[str], source: Path, tag: str) -> np.ndarray:
    """count_tokens(prompts), cached on disk by source file content, prompt format tag and tokenizer."""
    tokenizer = counting_tokenizer().name
    path = cache_dir() / "token_counts" / f"{tag}-{file_sha256(source)[:16]}-{tokenizer}.npy"
    if path.is_file():
        counts = np.load(path, allow_pickle=False)
        if counts.shape == (len(prompts),):
            return counts
    counts = count_tokens(prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.save(tmp, counts, allow_pickle=False)
    return counts


def mmlu_pro_prompt(question: str, options: Sequence[str]) -> str:
    """`question\\nA. option\\nB. option...`: the format the reference features were computed on."""
    return question + "\n" + "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))


def load_mmlu_pro(root: str | Path | None = None, *, targets: Sequence[str] | None = None,
                  limit: int | None = None) -> RoutingDataset:
    """MMLU-Pro: 12,002 questions x 28 LLMs, rows in the file order of questions.jsonl.gz.

    Y = correct (0/1). groups = category. Cost uses models.csv prices, input tokens counted with
    `count_tokens` and output tokens = output_chars / 4; output_chars == 0 means unrecorded and is imputed by
    median output tokens (over all rows here; refit on training rows with
    `ds.with_costs(CostModel.fit(ds, train_rows))`).
    """
    folder = data_root(root) / "mmlu-pro"
    questions_path = _require(folder / "questions.jsonl.gz")
    outcomes_path = _require(folder / "outcomes.csv.gz")
    models_path = _require(folder / "models.csv")

    prices = PriceTable.load(models_path)
    all_targets = prices.targets
    if targets is not None:
        unknown = [t for t in targets if t not in prices]
        if unknown:
            raise DataError(f"unknown MMLU-Pro model(s) {unknown}; known: {all_targets}",
                            file=str(models_path), field="model")
        all_targets = list(targets)

    ids, prompts, groups = [], [], []
    with gzip.open(questions_path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                q = json.loads(line)
                ids.append(str(q["question_id"]))
                prompts.append(mmlu_pro_prompt(q["question"], q["options"]))
                groups.append(q["category"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"bad question record: {exc}", file=str(questions_path),
                                line=line_no) from None
    input_tokens = _cached_token_counts(prompts, questions_path, "mmlu-pro-v1")
    if limit is not None:
        ids, prompts, groups = ids[:limit], prompts[:limit], groups[:limit]
        input_tokens = input_tokens[:limit]

    outcomes = pd.read_csv(outcomes_path, dtype={"question_id": str, "model": str})
    for column in ("question_id", "model", "correct", "output_chars"):
        if column not in outcomes.columns:
            raise DataError("missing column", file=str(outcomes_path), line=1, field=column)
    unknown = sorted(set(outcomes["model"].unique()) - set(prices.targets))
    if unknown:
        raise DataError(f"model(s) {unknown} have no price in models.csv", file=str(outcomes_path),
                        field="model")
    row_of = pd.Series(np.arange(len(ids)), index=ids)
    col_of = pd.Series(np.arange(len(all_targets)), index=all_targets)
    outcomes = outcomes[outcomes["question_id"].isin(row_of.index) & outcomes["model"].isin(col_of.index)]
    rows = row_of[outcomes["question_id"]].to_numpy()
    cols = col_of[outcomes["model"]].to_numpy()

    Y = np.full((len(ids), len(all_targets)), np.nan)
    Y[rows, cols] = outcomes["correct"].to_numpy(dtype=np.float64)
    chars = outcomes["output_chars"].to_numpy(dtype=np.float64)
    output_tokens = np.full(Y.shape, np.nan)
    output_tokens[rows, cols] = np.where(chars > 0, np.round(chars / CHARS_PER_TOKEN), np.nan)

    unrecorded = int(np.isnan(output_tokens).sum())
    notes = [(f"output tokens = recorded answer characters / {CHARS_PER_TOKEN:g} (an assumption), unknown "
              f"where no answer text was recorded ({unrecorded} of {output_tokens.size} pairs)"),
             f"input tokens counted with the {counting_tokenizer().name} tokenizer",
             "prices are models.csv's assumed 2024 list prices, not measurements"]
    ds = RoutingDataset(ids, prompts, list(all_targets), Y, np.zeros(Y.shape), groups, notes,
                        input_tokens=input_tokens, output_tokens=output_tokens, prices=prices)
    return ds.with_costs(CostModel.fit(ds))


def load_routellm(root: str | Path | None = None, *, benchmark: str = "mmlu",
                  exclude_contaminated: bool = True) -> RoutingDataset:
    """RouteLLM's data: Mixtral-8x7B-Instruct (weak, column 0) vs gpt-4-1106-preview (strong, column 1).

    Contaminated prompts are dropped as RouteLLM's benchmarks do: every row whose prompt equals an
    `eval_prompt` of `<benchmark>_contaminated_prompts.jsonl`. prompt_ids are `<benchmark>-<row in file>`.
    Output lengths are not recorded, so costs count input tokens only.
    """
    if benchmark not in ("mmlu", "gsm8k"):
        raise DataError(f"unknown RouteLLM benchmark '{benchmark}'; choose 'mmlu' or 'gsm8k'",
                        field="benchmark")
    folder = data_root(root) / "routellm"
    csv_path = _require(folder / f"{benchmark}.csv.gz")
    frame = pd.read_csv(csv_path)
    for column in ("prompt", ROUTELLM_WEAK, ROUTELLM_STRONG):
        if column not in frame.columns:
            raise DataError("missing column", file=str(csv_path), line=1, field=column)
    ids = [f"{benchmark}-{i}" for i in range(len(frame))]
    input_tokens = _cached_token_counts(frame["prompt"].tolist(), csv_path, f"routellm-{benchmark}-v1")
    notes = []
    keep = np.ones(len(frame), dtype=bool)
    if exclude_contaminated:
        contaminated_path = _require(folder / f"{benchmark}_contaminated_prompts.jsonl")
        contaminated = set()
        with open(contaminated_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        contaminated.add(json.loads(line)["eval_prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise DataError(f"bad record: {exc}", file=str(contaminated_path), line=line_no,
                                        field="eval_prompt") from None
        keep = ~frame["prompt"].isin(contaminated).to_numpy()
        notes.append(f"excluded {int((~keep).sum())} of {len(frame)} prompts listed as contaminated in "
                     f"{contaminated_path.name} (exact prompt match, as RouteLLM does)")

    targets = [ROUTELLM_WEAK, ROUTELLM_STRONG]
    Y = np.column_stack([_as_correct(frame[t], csv_path, t) for t in targets])
    groups = frame["subject"].astype(str).tolist() if "subject" in frame.columns else None
    prices = PriceTable(ROUTELLM_PRICES, source="RouteLLM default prices (assumed)")
    notes.append("prices assumed: gpt-4-1106-preview $10/$30 per M input/output tokens, "
                 "Mixtral-8x7B-Instruct $0.24/$0.24")
    ds = RoutingDataset(ids, frame["prompt"].tolist(), targets, Y, np.zeros(Y.shape), groups, notes,
                        input_tokens=input_tokens, output_tokens=np.full(Y.shape, np.nan), prices=prices)
    ds = ds.with_costs(CostModel.fit(ds))
    return ds.subset(np.flatnonzero(keep)) if exclude_contaminated else ds


def _as_correct(column: pd.Series, path: Path, name: str) -> np.ndarray:
    if column.dtype == bool:
        return column.to_numpy(dtype=np.float64)
    mapped = column.map({True: 1.0, False: 0.0, "True": 1.0, "False": 0.0})  # 1 == True and 0 == False
    bad = mapped.isna() & column.notna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"expected True/False, got {column.iloc[i]!r}", file=str(path), line=i + 2,
                        field=name)
    return mapped.to_numpy(dtype=np.float64)


BUILTIN_DATASETS = ("mmlu-pro", "routellm-mmlu", "routellm-gsm8k")


def load_dataset(name: str, *, data_root: str | Path | None = None, prices: str | Path | None = None,
                 targets: Sequence[str] | None = None, limit: int | None = None, sample: int | None = None,
                 sample_seed: int = 0, columns: Mapping[str, str] | None = None) -> RoutingDataset:
    """A dataset by name, as every command reads one: a built-in dataset (BUILTIN_DATASETS, under `data_root`)
    or a routing data file (with `prices` for a file without costs). Then the subset `targets`, in that order,
    and at most one of `limit` (the first N prompts) and `sample` (a seeded, category-stratified N). Both are
    deterministic, so features extracted with one line up with a later evaluation or training using it.
    `columns` names a data file's columns (read_routing_data's id_col, category_col, cost_col, split_col).

    A bad argument is a ConfigError whose `field` is the parameter's name."""
    from prefill_router.data.readers import read_routing_data

    if limit is not None and sample is not None:
        raise ConfigError("give limit or sample, not both", field="limit")
    if limit is not None and limit <= 0:
        raise ConfigError("must be a positive number of prompts", field="limit")
    columns = dict(columns or {})
    if columns and name in BUILTIN_DATASETS:
        raise ConfigError(f"names a column of a data file; the built-in dataset {name!r} has its own",
                          field=next(iter(columns)))
    if name == "mmlu-pro":
        ds = load_mmlu_pro(data_root, targets=targets, limit=limit)
        targets = None  # already selected by the loader, which names unknown models
    elif name in ("routellm-mmlu", "routellm-gsm8k"):
        ds = load_routellm(data_root, benchmark=name.split("-", 1)[1])
    elif Path(name).exists():
        ds = read_routing_data(name, prices=prices, **columns)
    else:
        raise ConfigError(f"{name!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor an "
                          f"existing file", field="dataset")
    if targets is not None:
        unknown = [t for t in targets if t not in ds.targets]
        if unknown:
            raise ConfigError(f"unknown target(s) {unknown}; known: {ds.targets}", field="targets")
        ds = ds.select_targets(targets)
    return select_rows(ds, limit=limit, sample=sample, sample_seed=sample_seed)


def select_rows(ds: RoutingDataset, *, limit: int | None = None, sample: int | None = None,
                sample_seed: int = 0) -> RoutingDataset:
    """The first `limit` prompts, or a seeded category-stratified `sample` of them (noted in ds.notes)."""
    from prefill_router.data.splits import stratified_sample

    if limit is not None:
        return ds.subset(np.arange(limit)) if ds.n > limit else ds
    if sample is not None:
        rows = stratified_sample(ds, sample, seed=sample_seed)
        if rows.size < ds.n:
            ds = ds.subset(rows)
            kind = "a category-stratified" if ds.groups is not None else "a random"
            ds.notes.append(f"rows: {kind} sample of {rows.size} prompts (--sample {sample}, "
                            f"--sample-seed {sample_seed})")
    return ds
