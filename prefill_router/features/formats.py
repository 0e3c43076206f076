"""The encoder's number format: fp32, bf16, fp16, or int8 (float32 weights with torch's dynamic int8 Linear layers).

`dtype: auto` lets the hardware decide. On a GPU that is bf16. On a CPU it is what the CPU has:
- bf16 where it has AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`): bf16 matmuls run at up to twice the fp32
  rate there (far more with AMX), and the features stay within a small fraction of their spread;
- else int8 where it has VNNI (`avx512_vnni`, `avx_vnni`), which runs int8 dot products in one instruction, so
  the dynamic int8 Linear layers pay; their features move more than bf16's, but the router's AUC held within
  0.005 of fp32 (bench/formats.py measures both on the machine at hand);
- else fp32.
CPU flags come from /proc/cpuinfo (Linux); elsewhere none are known and the CPU gets fp32.

Unset (`None`), the format is the reference one features are extracted and trained in: fp32 on a CPU, bf16 on a
GPU. The format is not part of the encoder's identity: it changes the features by rounding only, so a router
trained on fp32 features serves in bf16 or int8 (the gateway's `router.dtype`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from prefill_router.errors import ConfigError

NumberFormat = Literal["fp32", "bf16", "fp16", "int8"]
FORMATS: tuple[NumberFormat, ...] = ("fp32", "bf16", "fp16", "int8")
# The names torch and older configurations use for the same formats.
FORMAT_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed in `path` (Linux's /proc/cpuinfo); empty when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_format(flags: Iterable[str]) -> tuple[NumberFormat, str]:
    """(format, why) for a CPU with these flags: bf16, else int8, else fp32 (see the module docstring)."""
    flags = set(flags)
    bf16 = [f for f in BF16_FLAGS if f in flags]
    if bf16:
        return "bf16", f"the CPU has {', '.join(bf16)}"
    vnni = [f for f in VNNI_FLAGS if f in flags]
    if vnni:
        return "int8", f"the CPU has {', '.join(vnni)} but no bf16 instructions"
    return "fp32", "the CPU has neither bf16 nor VNNI instructions"


def resolve_format(requested: str | None, device_type: str, flags: Iterable[str] | None = None,
                   ) -> tuple[NumberFormat, str]:
    """(format, why) for a requested dtype (None, "auto" or a format) on a device type ("cpu", "cuda", "mps").
    `flags`: the CPU's flags (default: read from /proc/cpuinfo, for "auto" on a CPU only)."""
    requested = FORMAT_ALIASES.get(requested, requested) if requested is not None else None
    if requested is None:
        return ("fp32", "the reference format on a CPU") if device_type == "cpu" else \
            ("bf16", f"the reference format on {device_type}")
    if requested == "auto":
        if device_type != "cpu":
            return "bf16", f"auto on {device_type}"
        fmt, why = cpu_format(cpu_flags() if flags is None else flags)
        return fmt, f"auto: {why}"
    chosen = next((f for f in FORMATS if f == requested), None)
    if chosen is None:
        raise ConfigError(f"dtype: {requested!r} is not a number format (auto, {', '.join(FORMATS)})")
    if chosen == "int8" and device_type != "cpu":
        raise ConfigError(f"dtype: int8 runs on the CPU only (device is {device_type}); use bf16 there")
    return chosen, "as configured"
