"""The encoder's number format (features/formats.py): `dtype: auto` follows the CPU's flags (faked here), each
format's features stay close to fp32's with the same identity, and the gateway's `router.dtype` applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefill_router.errors import ConfigError
from prefill_router.features import formats
from prefill_router.features.encoder import EncoderSpec, load_encoder
from prefill_router.features.formats import cpu_flags, cpu_format, resolve_format
from prefill_router.serve.config import parse_gateway_config

CPUS = {  # flags as /proc/cpuinfo lists them (abridged), and the format auto picks
    "sapphire rapids (amx)": ("fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8", "bf16"),
    "zen 4 (avx512_bf16)": ("fpu sse2 avx2 avx512f avx512_vnni avx512_bf16", "bf16"),
    "cascade lake (vnni only)": ("fpu sse2 avx2 avx512f avx512_vnni", "int8"),
    "alder lake (avx_vnni)": ("fpu sse2 avx2 avx_vnni", "int8"),
    "zen 2 (neither)": ("fpu sse2 avx2 fma", "fp32"),
}
PROMPTS = ["what is the capital of france? A. paris B. rome", "the quick brown fox jumps over the lazy dog",
           "0123456789 + - * / = ( ) . , ? !", "question answer option the lazy dog", "what is 12 + 7?",
           "the capital of rome"]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: nothing known, so fp32


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_auto_picks_the_format_the_cpu_has(cpu):
    flags, expected = CPUS[cpu]
    assert cpu_format(flags.split())[0] == expected
    chosen, why = resolve_format("auto", "cpu", flags.split())
    assert chosen == expected and why.startswith("auto: ")
    assert resolve_format("auto", "cuda", flags.split())[0] == "bf16"
    assert resolve_format(None, "cpu", flags.split())[0] == "fp32"  # unset: the reference format, whatever the CPU


def test_formats_are_checked_and_named():
    assert resolve_format("bfloat16", "cpu") == ("bf16", "as configured")
    with pytest.raises(ConfigError, match="int8 runs on the CPU only"):
        resolve_format("int8", "cuda")
    with pytest.raises(ConfigError, match="'int4' is not a number format"):
        resolve_format("int4", "cpu")
    assert EncoderSpec(dtype="float32").dtype == "fp32" and EncoderSpec().dtype is None
    with pytest.raises(ConfigError, match="contradicts"):
        EncoderSpec.parse({"quantize": "int8", "dtype": "bf16"})


@pytest.fixture(scope="module")
def fp32(tiny_encoder_dir):
    return load_encoder(str(tiny_encoder_dir))


@pytest.mark.parametrize("cpu", ["zen 4 (avx512_bf16)", "cascade lake (vnni only)", "zen 2 (neither)"])
def test_auto_loads_each_format_with_the_same_identity_and_close_features(cpu, tiny_encoder_dir, fp32,
                                                                          monkeypatch):
    flags, expected = CPUS[cpu]
    monkeypatch.setattr(formats, "cpu_flags", lambda: frozenset(flags.split()))
    encoder = load_encoder(str(tiny_encoder_dir), dtype="auto")
    assert encoder.number_format == expected and encoder.format_reason.startswith("auto: the CPU has")
    linear = encoder.model.get_decoder().layers[0].self_attn.q_proj
    if expected == "int8":
        assert "quantized" in type(linear).__module__
    else:
        assert linear.weight.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    assert encoder.identity() == fp32.identity()  # the format is not part of it: an fp32 router serves in any
    ours = encoder.encode(PROMPTS, poolings=["mean", "last"])
    reference = fp32.encode(PROMPTS, poolings=["mean", "last"])
    for pooling in ("mean", "last"):
        a, b = ours[pooling][:, 1:], reference[pooling][:, 1:]  # state 0 (embeddings) is exact in every format
        spread = b.std(axis=0) + 1e-6
        error = np.median(np.abs(a - b) / spread)
        assert error < (0.3 if expected == "int8" else 0.1)  # loose: rounding, not a different model
        if expected == "fp32":
            np.testing.assert_array_equal(a, b)
        else:
            assert not np.array_equal(a, b)


def test_the_gateway_reads_dtype_and_the_old_quantize_name():
    targets = [{"name": "a", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]

    def router(**section):
        return parse_gateway_config({"router": {"checkpoint": None, **section}, "targets": targets}).router

    assert router().dtype == "auto"
    assert router(dtype="bf16").dtype == "bf16"
    assert router(quantize="int8").dtype == "int8"
    assert router(quantize=None).dtype == "fp32"  # "as trained"
    with pytest.raises(ConfigError, match="quantize"):
        router(quantize="int8", dtype="bf16")
    with pytest.raises(ConfigError, match="dtype"):
        router(dtype="int4")
