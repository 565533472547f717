"""What a (K+1)-token verification forward costs against a 1-token decode step, with transformers'
GQA key/value copy and without it (eval.attention), then also with fp32 linear layers that read their
weights once for a few rows (eval.few_row_linear), on the target alone, one process, interleaved.

Speculative decoding at K drafts per step is faster than the target alone only when τ exceeds this
ratio (plus the drafter's own cost), so on a CPU it decides whether a drafter with τ ≈ 1.2 pays.

    python bench/verify_cost.py                          # smollm2-135m, 300 cached tokens, one thread
    python bench/verify_cost.py --context 100 --tokens 1,2,3,4,7 --reps 20 --out /tmp/verify.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.result_file import write_result  # noqa: E402
from eval.attention import FORCE_GQA  # noqa: E402
from eval.few_row_linear import set_few_row_gemm  # noqa: E402
from trainer.precision import add_precision_arguments, precision_from_args  # noqa: E402

# mode -> (FORCE_GQA value, few-row fp32 linear layers): transformers' default, eval.attention's, both fixes
MODES = {"copy": ("0", False), "grouped": ("1", False), "grouped+gemm": ("1", True)}


def time_forwards(model, context: int, tokens: list[int], reps: int,
                  modes: dict[str, tuple[str, bool]]) -> tuple[dict[str, dict[int, float]], float]:
    """Median ms of an n-token forward over `context` cached tokens per mode, and the max logit difference
    from the copy mode."""
    import torch
    from transformers import DynamicCache

    from trainer.drafters.causal_lm import forward, rollback

    ids = torch.randint(100, model.config.vocab_size - 1, (context + max(tokens),))
    cache = DynamicCache(config=model.config)
    times = {mode: {n: [] for n in tokens} for mode in modes}
    logits = {}
    with torch.inference_mode():
        forward(model, ids[:context], cache, 1)
        for _ in range(reps):
            for mode, (value, gemm) in modes.items():
                os.environ[FORCE_GQA] = value
                set_few_row_gemm(model, gemm)
                for n in tokens:
                    rollback(cache, context)
                    start = time.perf_counter()
                    logits[mode, n], _ = forward(model, ids[context:context + n], cache, n, (-1,))
                    times[mode][n].append(time.perf_counter() - start)
    set_few_row_gemm(model, False)
    difference = max(float((logits["copy", n] - logits[mode, n]).abs().max()) for mode, n in logits)
    return {mode: {n: 1000 * statistics.median(t) for n, t in by_n.items()} for mode, by_n in times.items()}, difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m", help="target alias, HF directory or .gguf")
    parser.add_argument("--context", type=int, default=300, help="tokens already in the KV cache")
    parser.add_argument("--tokens", default="1,2,3,4", help="forward lengths to time (1 = a decode step)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per length and mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the bench gives each worker one)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "verify_cost.json"))
    add_precision_arguments(parser)
    args = parser.parse_args(argv)
    tokens = sorted({int(t) for t in args.tokens.split(",")} | {1})
    if args.context < 1 or args.reps < 1 or tokens[0] < 1:
        parser.error("--context, --reps and every --tokens value must be >= 1")
    precision = precision_from_args(parser, args, "cpu")

    import torch

    from pipeline.resolve.models import load_model, resolve_model

    torch.set_num_threads(args.threads)
    model = load_model(resolve_model(args.target).path, dtype=precision["dtype"], device="cpu")
    few_row_layers = set_few_row_gemm(model, True)  # 0 unless fp32: then the third mode would equal the second
    set_few_row_gemm(model, False)
    modes = {mode: setting for mode, setting in MODES.items() if few_row_layers or not setting[1]}
    saved = os.environ.get(FORCE_GQA)
    try:
        ms, difference = time_forwards(model, args.context, tokens, args.reps, modes)
    finally:
        os.environ.pop(FORCE_GQA, None) if saved is None else os.environ.update({FORCE_GQA: saved})
    print(f"{args.target}, {args.context} cached tokens, {args.threads} thread(s), median of {args.reps}; "
          f"{few_row_layers} linear layers take few-row products" + ("" if few_row_layers else " (fp32 only)"))
    last = list(modes)[-1]
    print(f"{'tokens':>6} " + " ".join(f"{mode + ' ms':>16} {'÷ 1-token':>9}" for mode in modes)
          + f" {last + ' ÷ copy, 1-token':>28}")
    for n in tokens:
        cells = " ".join(f"{ms[mode][n]:16.1f} {ms[mode][n] / ms[mode][1]:9.3f}" for mode in modes)
        print(f"{n:6d} {cells} {ms[last][n] / ms['copy'][1]:28.3f}")
    print(f"max |logit difference| from the copy mode: {difference:.3g}")
    result = {"target": args.target, "context": args.context, "threads": args.threads, "reps": args.reps,
              "few_row_layers": few_row_layers,
              "precision": precision, "ms": {mode: {str(n): v for n, v in by_n.items()} for mode, by_n in ms.items()},
              "ratio_to_one_token": {mode: {str(n): v / by_n[1] for n, v in by_n.items()} for mode, by_n in ms.items()},
              "max_logit_difference": difference}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
