"""Precision resolution: auto is bf16 only where it is native; explicit bf16 on an emulating CPU warns once."""
from __future__ import annotations

import pytest
import torch

from trainer.precision import (ASSUME_CPU_ENV, PrecisionError, bench_precision, cpu_capability, native_bf16,
                               precision_line, resolve_dtype, torch_dtype)


@pytest.fixture
def cpu_kind(monkeypatch):
    """Set the assumed CPU kind (LKSPEC_ASSUME_CPU) for one test."""
    return lambda kind: monkeypatch.setenv(ASSUME_CPU_ENV, kind)


@pytest.mark.parametrize("kind, capability, native", [
    ("avx2", "AVX2", False), ("avx512", "AVX512", False), ("avx512_bf16", "AVX512_BF16", True), ("amx", "AMX", True),
])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(cpu_kind, capsys, kind, capability, native):
    cpu_kind(kind)
    assert cpu_capability() == capability
    assert native_bf16("cpu") is native
    assert resolve_dtype("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_dtype("fp32", "cpu") == "fp32"
    assert capsys.readouterr().err == ""


def test_explicit_bf16_on_an_avx2_cpu_is_kept_with_one_warning_line_naming_the_cost(cpu_kind, capsys):
    cpu_kind("avx2")
    assert resolve_dtype("bf16", "cpu") == "bf16"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "AVX2" in lines[0] and "36x slower" in lines[0] and "358 ms" in lines[0] and "9.9 ms" in lines[0]
    assert resolve_dtype("bf16", "cpu", warn=False) == "bf16" and capsys.readouterr().err == ""


def test_explicit_bf16_on_a_native_cpu_does_not_warn(cpu_kind, capsys):
    cpu_kind("amx")
    assert resolve_dtype("bf16", "cpu") == "bf16"
    assert capsys.readouterr().err == ""


def test_cuda_follows_torch(cpu_kind):
    cpu_kind("amx")  # the CPU's kind says nothing about the GPU
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    assert native_bf16("cuda") is native
    assert resolve_dtype("auto", "cuda") == ("bf16" if native else "fp32")


def test_the_real_cpu_is_read_without_the_override(monkeypatch):
    monkeypatch.delenv(ASSUME_CPU_ENV, raising=False)
    flags = open("/proc/cpuinfo").read()
    expected = "amx_bf16" in flags or "avx512_bf16" in flags
    assert native_bf16("cpu") is expected
    if not expected:
        assert cpu_capability() == torch.backends.cpu.get_cpu_capability()


def test_bad_names_are_refused(cpu_kind):
    with pytest.raises(PrecisionError, match="auto, fp32, bf16.*'fp16'"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(PrecisionError, match="resolve 'auto' first"):
        torch_dtype("auto")
    assert (torch_dtype("fp32"), torch_dtype("bf16")) == (torch.float32, torch.bfloat16)
    cpu_kind("sse4")
    with pytest.raises(PrecisionError, match=f"{ASSUME_CPU_ENV}='sse4'"):
        cpu_capability()


def test_bench_precision_refuses_emulated_bf16_unless_allowed(cpu_kind, capsys):
    cpu_kind("avx2")
    record = bench_precision("auto", "cpu")
    assert (record["dtype"], record["cpu_capability"], record["native_bf16"], record["emulated"]) == \
        ("fp32", "AVX2", False, False)
    assert "fp32 (asked auto)" in precision_line(record) and "CPU AVX2" in precision_line(record)
    with pytest.raises(PrecisionError, match="--allow-emulated-bf16"):
        bench_precision("bf16", "cpu")
    record = bench_precision("bf16", "cpu", allow_emulated=True)
    assert record["emulated"] and "EMULATED" in precision_line(record)
    assert len(capsys.readouterr().err.splitlines()) == 1
    cpu_kind("amx")
    assert bench_precision("auto", "cpu")["dtype"] == "bf16"
