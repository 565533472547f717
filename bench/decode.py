"""Peer comparison: our speculative decoder vs transformers assisted generation, same pair, T = 0.

Both are exact greedy decoders with K drafted tokens per target forward (transformers with
num_assistant_tokens=K, a constant schedule and no confidence early-stop), so τ should agree within
noise and the comparison is about overhead. Each prompt runs: target alone (ours), ours with the
drafter, transformers generate() alone, transformers assisted generation, back to back on the
same threads. Prints a table and writes JSON. An EAGLE-3 drafter (which reads the target's hidden
states) has no transformers counterpart: only our decoder's rows are run for it.

    python bench/decode.py                       # smollm2-135m + a 2-layer drafter built from it
    python bench/decode.py --drafter runs/lk/model --k 5 --prompts 16
    python bench/decode.py --drafter eagle3      # an untrained EAGLE-3 drafter for the target
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.result_file import write_result  # noqa: E402
from pipeline.resolve.prompts import load_prompts  # noqa: E402
from eval.speculative import speculative_generate  # noqa: E402
from eval import load_drafter  # noqa: E402
from trainer.drafters import family_of_model  # noqa: E402
from pipeline.bench_job import encode_chat  # noqa: E402
from pipeline.resolve.home import lkspec_home  # noqa: E402
from pipeline.resolve.models import load_model, resolve_model  # noqa: E402
from trainer.precision import add_precision_arguments, precision_from_args  # noqa: E402


def build_layer_drafter(target_path: Path, layers: int = 2) -> Path:
    """A `layers`-deep Llama sharing the target's tokenizer, embeddings, LM head, final norm and its
    first and last decoder layers (no training: acceptance comes from the shared weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    identity = resolve_model(str(target_path)).identity
    out = lkspec_home() / "models" / f"layer-drafter-{layers}-{identity['weights_sha256'][:16]}"
    if (out / "config.json").is_file():
        return out
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    config = AutoConfig.from_pretrained(target_path)
    config.num_hidden_layers = layers
    drafter = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    keep = [0, *range(target.config.num_hidden_layers - layers + 1, target.config.num_hidden_layers)]
    with torch.no_grad():
        drafter.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
        drafter.model.norm.load_state_dict(target.model.norm.state_dict())
        drafter.lm_head.load_state_dict(target.lm_head.state_dict())
        for mine, theirs in zip(drafter.model.layers, keep):
            mine.load_state_dict(target.model.layers[theirs].state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    drafter.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(target_path).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def build_eagle3_drafter(target_path: Path, draft_vocab: int = 32000) -> Path:
    """An untrained EAGLE-3 export for the target: its width, heads and embeddings, a draft vocabulary of
    the `draft_vocab` lowest ids (for decode speed only: it accepts nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.target_pass import aux_layers
    from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
    from trainer.drafters.eagle3.export import save_eagle3

    identity = resolve_model(str(target_path)).identity
    out = lkspec_home() / "models" / f"eagle3-untrained-{draft_vocab}-{identity['weights_sha256'][:16]}"
    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(target_path)
    torch.manual_seed(0)
    drafter = Eagle3Model(Eagle3Config(
        vocab_size=config.vocab_size, draft_vocab_size=min(draft_vocab, config.vocab_size),
        hidden_size=config.hidden_size, target_hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, aux_layers=aux_layers(config.num_hidden_layers),
        rms_norm_eps=config.rms_norm_eps, rope_theta=getattr(config, "rope_theta", None) or 10000.0,
        max_position_embeddings=config.max_position_embeddings))
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    with torch.no_grad():
        drafter.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_eagle3(drafter, tmp)
    AutoTokenizer.from_pretrained(target_path).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def ours(target, drafter, input_ids, k, max_new_tokens, eos):
    start, cpu_start = time.perf_counter(), time.process_time()
    output, stats = speculative_generate(target, drafter, input_ids, k=k, temperature=0.0,
                                         max_new_tokens=max_new_tokens, eos_token_id=eos)
    return output.tolist(), time.perf_counter() - start, time.process_time() - cpu_start, stats["target_forwards"]


def theirs(target, drafter, input_ids, k, max_new_tokens, eos):
    calls = [0]
    hook = target.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    kwargs = {}
    if drafter is not None:
        drafter.generation_config.num_assistant_tokens = k
        drafter.generation_config.num_assistant_tokens_schedule = "constant"
        drafter.generation_config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = drafter
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        output = target.generate(input_ids[None], do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else eos[0],
                                 attention_mask=torch.ones_like(input_ids[None]), **kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    hook.remove()
    return output[0, input_ids.numel():].tolist(), seconds, cpu_seconds, calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", default=None,
                        help="HF dir or EAGLE-3 export, `self` (the target drafts for itself: every draft "
                        "accepted) or `eagle3` (an untrained EAGLE-3 drafter for the target); "
                        "default: a 2-layer drafter built from the target's weights")
    parser.add_argument("--bench", default="mt-bench", help="prompt set (pipeline.resolve.prompts name or .jsonl)")
    parser.add_argument("--prompts", type=int, default=8, help="evenly spaced prompts from the set")
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_precision_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args()
    precision = precision_from_args(parser, args, "cpu")
    args.dtype = precision["dtype"]  # fp32 or bf16 from here on

    torch.set_num_threads(args.threads)
    target_path = resolve_model(args.target).path
    if args.drafter is None:
        drafter_path = build_layer_drafter(target_path)
    elif args.drafter == "eagle3":
        drafter_path = build_eagle3_drafter(target_path)
    else:
        drafter_path = target_path if args.drafter == "self" else Path(args.drafter)
    target = load_model(target_path, dtype=args.dtype)
    drafter = load_drafter(drafter_path, target)
    drafter_kind = family_of_model(drafter).name
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_path)
    eos = target.generation_config.eos_token_id
    prompts = [torch.tensor(encode_chat(tokenizer, p.text)) for p in load_prompts(args.bench, args.prompts)]

    runs = {  # name -> (function, drafter)
        "ours target alone": (ours, None), "ours speculative": (ours, drafter),
        "hf target alone": (theirs, None), "hf assisted": (theirs, drafter),
    }
    if drafter_kind != "independent":  # transformers' assisted generation takes causal LMs only
        runs = {name: run for name, run in runs.items() if name.startswith("ours")}
    for fn, d in runs.values():  # warm-up
        fn(target, d, prompts[0][:8], args.k, 4, eos)
    totals = {name: {"tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0, "target_forwards": 0} for name in runs}
    outputs = {name: [] for name in runs}
    for i, input_ids in enumerate(prompts):
        for name, (fn, d) in runs.items():
            ids, seconds, cpu_seconds, forwards = fn(target, d, input_ids, args.k, args.max_new_tokens, eos)
            totals[name]["tokens"] += len(ids)
            totals[name]["seconds"] += seconds
            totals[name]["cpu_seconds"] += cpu_seconds
            totals[name]["target_forwards"] += forwards
            outputs[name].append(ids)
        print(f"prompt {i + 1}/{len(prompts)}: {len(prompts[i])} prompt tokens, "
              f"{len(outputs['ours target alone'][-1])} new", file=sys.stderr)

    reference = outputs["ours target alone"]
    rows = []
    for name, total in totals.items():
        rows.append({
            "name": name, "tokens": total["tokens"], "seconds": total["seconds"],
            "cpu_seconds": total["cpu_seconds"], "tokens_per_s": total["tokens"] / total["seconds"],
            "tokens_per_cpu_s": total["tokens"] / total["cpu_seconds"],
            "target_forwards": total["target_forwards"],
            "tau": total["tokens"] / max(total["target_forwards"], 1),
            "outputs_equal_target_greedy": sum(o == r for o, r in zip(outputs[name], reference)),
        })
    base = {}  # each decoder's own "target alone" row comes first
    for row in rows:
        base.setdefault(row["name"].split()[0], row["tokens_per_s"])
    for row in rows:
        row["speedup_vs_own_baseline"] = row["tokens_per_s"] / base[row["name"].split()[0]]

    drafter_name = "self" if args.drafter == "self" else drafter_path.name
    print(f"\n{args.target} + {drafter_name}, K={args.k}, T=0, {len(prompts)} {args.bench} prompts, "
          f"max {args.max_new_tokens} new tokens, {args.dtype}, {args.threads} threads")
    print(f"{'':20s} {'tokens/s':>9s} {'tok/cpu-s':>10s} {'tau':>6s} {'speed-up':>9s} {'= greedy':>9s}")
    for row in rows:
        print(f"{row['name']:20s} {row['tokens_per_s']:9.2f} {row['tokens_per_cpu_s']:10.2f} {row['tau']:6.2f} "
              f"{row['speedup_vs_own_baseline']:8.2f}x {row['outputs_equal_target_greedy']:5d}/{len(prompts)}")
    ratio = cpu_ratio = None
    if len(rows) == 4:
        ratio = rows[1]["tokens_per_s"] / rows[3]["tokens_per_s"]
        cpu_ratio = rows[1]["tokens_per_cpu_s"] / rows[3]["tokens_per_cpu_s"]
        print(f"ours speculative / hf assisted: {ratio:.2f}x tokens/s, {cpu_ratio:.2f}x tokens per CPU-second")

    result = {
        "target": args.target, "drafter": drafter_name, "drafter_path": str(drafter_path), "k": args.k,
        "drafter_kind": drafter_kind,
        "temperature": 0.0, "bench": args.bench, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype, "precision": precision, "threads": args.threads, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "rows": rows,
        "ours_over_hf_tokens_per_s": ratio, "ours_over_hf_tokens_per_cpu_s": cpu_ratio,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
