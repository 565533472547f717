"""Benchmark the drafter losses: forward+backward time ÷ KL's, and peak extra memory ÷ draft logits.

    python bench/losses.py                       # V ∈ {49152, 151936}, N = 4096, dense and top-64
    python bench/losses.py --n 1024 --vocab 151936 --out /tmp/losses.json

Each case runs in a fresh subprocess so that measurements do not leak into each other.

Time: every loss of a case runs in the same process, interleaved round by round (KL, TV, LK^α,
LK^λ, ...), after one warm-up. Each round gives each loss's forward+backward time ÷ KL's in the
same round (neighbours in time share the machine's load); the reported ratio is the median over
--repeats rounds, and the times are medians. On CUDA the ratio uses synchronized wall time; on CPU
the process's CPU time (`time.process_time`), which other jobs on a shared machine disturb less
than wall time (both are recorded).

Memory: on CUDA, `torch.cuda.max_memory_allocated()` after a reset, minus the memory allocated
before the call. On CPU, the process's resident-set high-water mark (VmHWM): the inputs (draft
logits, target) are built and touched, a warm-up on a tiny input loads the kernels, the peak is
reset to the current RSS (`echo 5 > /proc/self/clear_refs`), then one forward+backward runs and
VmHWM − baseline RSS is the extra memory. That includes the gradient of the logits (kept in
`.grad`) and every transient the loss allocated, measured at page granularity; one subprocess per
(case, loss) so an earlier loss's freed-but-retained heap cannot hide a later one's peak.

Children flush subnormal floats to 0, as the training workers do. `--logit-scale 30` gives draft
logits as spread as those of a MEDUSA head after a few dozen LK^α steps.

Reference row `torch_kl`: the plain unchunked torch formula (fp32 log_softmax of both sides, KL,
autograd), for what the chunked kernel saves. It needs several fp32 copies of the logits:
--no-reference skips it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.result_file import write_result  # noqa: E402
from trainer.precision import add_precision_arguments, precision_from_args  # noqa: E402

LOSSES = ("kl", "tv", "lk_alpha", "lk_lambda")


# ------------------------------------------------------------------------------ child side
def _inputs(v: int, n: int, target: str, k: int, dtype: str, device: str, logit_scale: float, seed: int = 0):
    import torch

    from trainer.losses import DenseTarget, SparseTarget
    from trainer.precision import torch_dtype

    dt = torch_dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * logit_scale).to(device=device, dtype=dt).requires_grad_()
    target_logits = (torch.randn(n, v, generator=g) * 3.0).to(device=device, dtype=dt)
    if target == "dense":
        return logits, DenseTarget(logits=target_logits)
    logprobs, ids = torch.log_softmax(target_logits.float(), dim=-1).topk(k, dim=-1)
    del target_logits
    return logits, SparseTarget(ids=ids.to(torch.int32), logprobs=logprobs)


def _step(name: str, logits, target, tail: str):
    import torch

    from trainer.losses import DenseTarget, compute_loss

    if name == "torch_kl":  # unchunked reference
        logq = torch.log_softmax(logits.float(), dim=-1)
        if isinstance(target, DenseTarget):
            logp = torch.log_softmax(target.logits.float(), dim=-1)
            loss = (logp.exp() * (logp - logq)).sum(-1).mean()
        else:
            p = target.logprobs.exp()
            loss = (p * (target.logprobs - logq.gather(1, target.ids.long()))).sum(-1).mean()
    else:
        loss = compute_loss(name, logits, target, tail=tail).loss
    loss.backward()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_time(args) -> dict:
    logits, target = _inputs(args.v, args.n, args.target, args.k, args.dtype, args.device, args.logit_scale)
    names = list(args.losses)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate: no fixed position
        for name in order:
            logits.grad = None
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            _step(name, logits, target, args.tail)
            _sync(args.device)
            if rnd:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    basis = wall if args.device == "cuda" else cpu
    # the ratio to KL within each round (adjacent runs share the machine's load), then the median
    return {name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name]),
                   "time_vs_kl": statistics.median(x / k for x, k in zip(basis[name], basis["kl"]))}
            for name in names}


def child_memory(args) -> dict:
    import ctypes
    import gc

    import torch

    small_logits, small_target = _inputs(1000, 8, args.target, min(args.k, 16), args.dtype, args.device,
                                         args.logit_scale)
    _step(args.loss, small_logits, small_target, args.tail)  # load kernels before measuring
    del small_logits, small_target
    logits, target = _inputs(args.v, args.n, args.target, args.k, args.dtype, args.device, args.logit_scale)
    logits_bytes = logits.numel() * logits.element_size()
    gc.collect()
    if args.device == "cuda":
        _sync(args.device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(args.loss, logits, target, args.tail)
        _sync(args.device)
        extra = torch.cuda.max_memory_allocated() - before
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before_kib = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        _step(args.loss, logits, target, args.tail)
        extra = (_rss_kib("VmHWM") - before_kib) * 1024
    return {"extra_bytes": extra, "logits_bytes": logits_bytes}


# ----------------------------------------------------------------------------- parent side
def _run_child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode]
    for key, val in kw.items():
        cmd += [f"--{key.replace('_', '-')}", *([str(v) for v in val] if isinstance(val, list) else [str(val)])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    ap.add_argument("--n", type=int, default=4096, help="positions (batch × sequence)")
    ap.add_argument("--k", type=int, default=64, help="top-k of the sparse target")
    ap.add_argument("--targets", nargs="+", default=["dense", "topk"], choices=["dense", "topk"])
    ap.add_argument("--tail", default="bucket", choices=["bucket", "drop"])
    ap.add_argument("--logit-scale", type=float, default=2.0,
                    help="std of the random draft logits (default 2; a draft trained with LK^α spreads its "
                         "logits to ~30, where most of exp(log q) falls below fp32's normal range)")
    add_precision_arguments(ap)  # --dtype of the draft/target logits
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-reference", action="store_true", help="skip the unchunked torch KL row")
    ap.add_argument("--reference-max-gib", type=float, default=8.0,
                    help="skip the torch KL row where it would need more than this (≈10× the logits)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "losses.json"))
    # child-process arguments
    ap.add_argument("--child", choices=["time", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--v", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--loss", help=argparse.SUPPRESS)
    ap.add_argument("--losses", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        from trainer.loop import flush_subnormals

        flush_subnormals()  # as the training workers do
        if args.threads:
            torch.set_num_threads(args.threads)
        result = child_time(args) if args.child == "time" else child_memory(args)
        print(json.dumps(result))
        return
    precision = precision_from_args(ap, args, args.device)
    args.dtype = precision["dtype"]  # the children get fp32 or bf16

    rows = []
    for v in args.vocab:
        for target in args.targets:
            names = list(LOSSES)
            ref_gib = 10 * args.n * v * (2 if args.dtype == "bf16" else 4) / 2**30  # ≈10× the logits
            if not args.no_reference and ref_gib <= args.reference_max_gib:
                names.append("torch_kl")
            common = dict(v=v, n=args.n, target=target, k=args.k, tail=args.tail, dtype=args.dtype,
                          device=args.device, threads=args.threads, logit_scale=args.logit_scale)
            times = _run_child("time", losses=names, repeats=args.repeats, **common)
            for name in names:
                row = {"vocab": v, "n": args.n, "target": target if target == "dense" else f"top-{args.k}",
                       "loss": name, **times[name]}
                if not args.no_memory:
                    mem = _run_child("memory", loss=name, **common)
                    row.update(extra_bytes=mem["extra_bytes"], logits_bytes=mem["logits_bytes"],
                               mem_vs_logits=mem["extra_bytes"] / mem["logits_bytes"])
                rows.append(row)
                print(_fmt(row), flush=True)

    meta = {"device": args.device, "dtype": args.dtype, "precision": precision, "tail": args.tail,
            "logit_scale": args.logit_scale,
            "repeats": args.repeats,
            "time_basis": "wall (synchronized)" if args.device == "cuda" else "process CPU time",
            "torch_threads": args.threads or _threads(), "cpu_count": os.cpu_count(),
            "memory_method": "cuda max_memory_allocated" if args.device == "cuda"
            else "VmHWM - VmRSS after clear_refs=5, one subprocess per (case, loss)"}
    print()
    print(_table(rows))
    print()
    write_result(args.out, {"meta": meta, "rows": rows})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _fmt(row: dict) -> str:
    mem = f"  mem {row['mem_vs_logits']:.3f}×" if "mem_vs_logits" in row else ""
    return (f"V={row['vocab']:>6} {row['target']:>6} {row['loss']:>9}: wall {row['wall_s']:.3f}s "
            f"cpu {row['cpu_s']:.3f}s ({row['time_vs_kl']:.3f}× KL){mem}")


def _table(rows: list[dict]) -> str:
    head = ("| V | target | loss | fwd+bwd wall s | fwd+bwd CPU s | time ÷ KL | extra mem ÷ logits |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        mem = f"{r['mem_vs_logits']:.3f}" if "mem_vs_logits" in r else "–"
        lines.append(f"| {r['vocab']} | {r['target']} | {r['loss']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
                     f"{r['time_vs_kl']:.3f} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
