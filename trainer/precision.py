"""Floating-point precision: which dtype a device computes natively, and what `--dtype auto` picks.

bf16 is fast only where the hardware has it: CUDA devices with bf16 support, and x86 CPUs with
AVX-512 BF16 or AMX. Elsewhere torch emulates it; on a 2-core AVX2 EPYC a [256x576]x[576x1536]
matmul takes 358 ms in bf16 against 9.9 ms in fp32 (36x slower). So `auto` is bf16 only where it
is native and fp32 everywhere else; an explicit bf16 is honoured with a one-line warning.

`LKSPEC_ASSUME_CPU=avx2` (or avx512, avx512_bf16, amx) makes this module answer as if the CPU
were of that kind, so tests and CI can take the AVX2 path on any machine.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from trainer import notices

DTYPES = ("fp32", "bf16")  # what a resolved dtype can be
DTYPE_CHOICES = ("auto", *DTYPES)  # what a user may ask for
ASSUME_CPU_ENV = "LKSPEC_ASSUME_CPU"
ASSUMED_CPUS = {"avx2": "AVX2", "avx512": "AVX512", "avx512_bf16": "AVX512_BF16", "amx": "AMX"}
NATIVE_BF16_CPUS = ("AVX512_BF16", "AMX")  # cpu_capability() values that compute bf16 natively
EMULATED_BF16_COST = ("about 36x slower than fp32 (a [256x576]x[576x1536] matmul: 358 ms in bf16 vs 9.9 ms "
                      "in fp32 on a 2-core AVX2 EPYC)")
ALLOW_EMULATED_FLAG = "--allow-emulated-bf16"
AUTO_HELP = ("auto: bf16 where the device computes it natively (CUDA with bf16, a CPU with AVX-512 BF16 or AMX), "
             "else fp32")


class PrecisionError(ValueError):
    """A dtype name is unknown, or a benchmark would time an emulated bf16 path."""


def torch_dtype(name: str):
    """The torch dtype of a resolved dtype name (fp32, bf16)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise PrecisionError(f"dtype must be one of {', '.join(DTYPES)} here (resolve 'auto' first), got {name!r}")
    return dtypes[name]


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_capability() -> str:
    """This CPU's vector kind: AMX, AVX512_BF16, or torch's own answer (AVX2, AVX512, DEFAULT, ...)."""
    assumed = os.environ.get(ASSUME_CPU_ENV)
    if assumed:
        if assumed.lower() not in ASSUMED_CPUS:
            raise PrecisionError(f"${ASSUME_CPU_ENV}={assumed!r}: expected one of {', '.join(ASSUMED_CPUS)}")
        return ASSUMED_CPUS[assumed.lower()]
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    import torch

    return torch.backends.cpu.get_cpu_capability()


def native_bf16(device) -> bool:
    """Whether `device` (cpu, cuda, cuda:N or a torch.device) computes bf16 matmuls natively."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return cpu_capability() in NATIVE_BF16_CPUS
    return False


def emulation_note(device) -> str:
    """What bf16 costs on a device without native bf16 (one clause, for warnings and refusals)."""
    import torch

    if torch.device(device).type == "cpu":
        return f"bf16 on this CPU ({cpu_capability()}: no AVX-512 BF16 or AMX) is emulated, {EMULATED_BF16_COST}"
    return f"bf16 on {device} is not native (emulated, much slower)"


def resolve_dtype(requested: str, device, *, warn: bool = True) -> str:
    """fp32 or bf16 for `requested` (auto, fp32, bf16) on `device`: auto is bf16 only where it is native.

    An explicit bf16 on a CPU that emulates it is kept, with a one-line warning on stderr (unless
    warn=False). A GPU this process cannot see (a remote cluster's) counts as not native: auto is fp32.
    """
    import torch

    if requested not in DTYPE_CHOICES:
        raise PrecisionError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and warn and torch.device(device).type == "cpu" and not native_bf16(device):
        notices.warn(f"{emulation_note(device)}; --dtype auto picks fp32 here")
    return requested


def bench_precision(requested: str, device, *, allow_emulated: bool = False) -> dict:
    """A benchmark's precision record (resolved dtype, CPU kind, native bf16); refuses to time emulated bf16.

    Raises PrecisionError when the resolved dtype is bf16 on a device without native bf16, unless
    `allow_emulated` (then it warns on stderr).
    """
    import torch

    dtype = resolve_dtype(requested, device, warn=False)
    native = native_bf16(device)
    if dtype == "bf16" and not native:
        if not allow_emulated:
            raise PrecisionError(f"refusing to time an emulated path: {emulation_note(device)}. Use --dtype auto "
                                 f"or fp32, or pass {ALLOW_EMULATED_FLAG} to time it anyway")
        notices.warn(f"timing an emulated path ({ALLOW_EMULATED_FLAG}): {emulation_note(device)}")
    return {"dtype": dtype, "requested": requested, "device": str(device), "cpu_capability": cpu_capability(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native,
            "emulated": dtype == "bf16" and not native}


def precision_line(record: dict) -> str:
    """One header line for a bench_precision record."""
    emulated = ", EMULATED" if record["emulated"] else ""
    return (f"precision: {record['dtype']} (asked {record['requested']}) on {record['device']}; CPU "
            f"{record['cpu_capability']}, native bf16 {'yes' if record['native_bf16'] else 'no'}{emulated}")


def precision_from_args(parser, args, device) -> dict:
    """bench_precision for a script's --dtype / --allow-emulated-bf16 on `device`, printed as one line.

    A refusal ends the script through parser.error (exit status 2) with the refusal's message.
    """
    try:
        record = bench_precision(args.dtype, device, allow_emulated=args.allow_emulated_bf16)
    except PrecisionError as exc:
        parser.error(str(exc))
    print(precision_line(record), flush=True)
    return record


def add_precision_arguments(parser, default: str = "auto") -> None:
    """--dtype (auto, fp32, bf16) and --allow-emulated-bf16 on a benchmark script's argument parser."""
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=default,
                        help=f"precision (default {default}; {AUTO_HELP})")
    parser.add_argument(ALLOW_EMULATED_FLAG, action="store_true",
                        help="time bf16 even on a CPU that emulates it (refused by default)")
