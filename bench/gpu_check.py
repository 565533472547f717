"""Device check of lkspec's GPU paths, without Ray: cache build, training, losses, speculative decoding.

    python bench/gpu_check.py --device cuda --out $OUT            # one GPU; default parts sized for < 8 min on an H200 (not yet timed)
    python bench/gpu_check.py --device cpu --quick --out /tmp/gc  # the same logic, small shapes, on a CPU

Models are random-weight transformers built from configs of real shapes (SmolLM2-135M, Qwen2.5-1.5B)
and the `tiny` drafter preset: no weights travel. Each part is timed and guarded: a failure is
recorded with its traceback and the next part still runs. Results go to OUT/gpu_check.json and a
table on stdout. The two goals: build ÷ bare forward >= 0.90 with host encoding included (the build
part's "worker" column) and LK^λ step ÷ KL step <= 1.05 (the train part).

Every part runs in --dtype (default auto: bf16 on a GPU with bf16; on a CPU bf16 only with AVX-512
BF16 or AMX, and an emulated bf16 is refused unless --allow-emulated-bf16).

1. build: the honest reference is `target_pass.bare_forward` (backbone + LM head at the trained
   positions only). Against it, on the same batch: `target_topk` (top-k minus log-sum-exp, results
   copied to the host), with and without EAGLE-3 aux features; and the worker path as its Ray
   actor runs it: `TargetWorker.run_shard` over several shards, two in flight (one on the GPU, one
   being encoded and committed), wall time over all shards. Shards are read back with open_cache
   and the stored top-1 is checked against the full model's fp32 log_softmax.
   syncs: the CUDA synchronizations (torch's sync debug mode) of one build batch and of one KL and
   one LK^λ loss step, with the file:line of each.
2. train: `trainer.loop.run_worker` in this process (RANK=0, WORLD_SIZE=1; NCCL on GPU, gloo on CPU)
   training the tiny drafter from the SmolLM2-shaped cache with kl, lk_alpha and lk_lambda (40 steps,
   medians after 10); and the loss-only bench (bench/losses.py's functions) at N x V with dense and
   top-64 targets.
3. decode (not in the default parts): `eval.speculative.speculative_generate` with the
   SmolLM2-shaped target drafting for itself (acceptance 1: the decoder's overhead ceiling) and
   with the tiny drafter, vs the target alone (k=0) and vs transformers `generate(assistant_model=...)`.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.precision import add_precision_arguments, precision_from_args, torch_dtype  # noqa: E402

# (model_type, layers, hidden, heads, kv_heads, intermediate, vocab): the real models' shapes
SHAPES = {
    "smollm2-135m": ("llama", 30, 576, 9, 3, 1536, 49152),
    "qwen2.5-1.5b": ("qwen2", 28, 1536, 12, 2, 8960, 151936),
}
QUICK_SHAPES = {  # same vocabularies, shallow and narrow
    "smollm2-135m": ("llama", 2, 64, 4, 2, 128, 49152),
    "qwen2.5-1.5b": ("qwen2", 2, 64, 4, 2, 128, 151936),
}
TRAIN_LOSSES = ("kl", "lk_alpha", "lk_lambda")
BENCH_LOSSES = ("kl", "tv", "lk_alpha", "lk_lambda")
K = 64


# ------------------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def random_model(shape: tuple, device: str, dtype: str, seed: int = 0):
    """A random-weight causal LM of the given shape in `dtype`, built on `device` from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, layers, hidden, heads, kv_heads, intermediate, vocab = shape
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(torch_dtype(dtype)).eval()


def tiny_drafter(vocab: int, device: str, dtype: str):
    """The `tiny` drafter preset (the trainer's default drafter) as a HF causal LM in `dtype` on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.drafters import resolve_drafter_spec

    spec = resolve_drafter_spec("tiny", {}, vocab_size=vocab, max_positions=4096,
                                token_ids={"bos": 1, "eos": 2, "pad": None})
    torch.manual_seed(1)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**spec.hf_config))
    return model.to(torch_dtype(dtype)).eval()


def peak_gib(device: str) -> float | None:
    """Peak GPU memory allocated since the last reset (None on CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    """Free cached GPU blocks and restart the peak-memory counter (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- 1. cache build
def random_samples(count: int, length: int, vocab: int, seed: int, prefix: str) -> list:
    """Random token sequences; every position after the first eighth is trained on."""
    from pipeline.target_pass import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        mask = np.arange(length) >= length // 8
        samples.append(Sample(f"{prefix}:{i}", rng.integers(3, vocab, length, dtype=np.int32), mask))
    return samples


def check_build(name: str, shape: tuple, args, workdir: Path) -> dict:
    """Worker-path shards + read-back check + build ÷ bare-forward throughput on one batch."""
    from cache import CacheWriter, content_key, create_manifest, open_cache
    from pipeline.target_pass import aux_layers, bare_forward, target_topk
    from pipeline.target_worker import SHARDS_IN_FLIGHT, ShardTask, TargetWorker, WorkerSpec

    device = args.device
    layers, hidden, vocab = shape[1], shape[2], shape[6]
    batch, length = args.batch, args.length
    model_dir, cache_dir = workdir / f"{name}-model", workdir / f"{name}-cache"
    started = time.perf_counter()
    random_model(shape, device, args.dtype).save_pretrained(model_dir, safe_serialization=True)
    reset_peak(device)
    aux = aux_layers(layers)
    spec = WorkerSpec(model_path=str(model_dir), dtype=args.dtype, cache_dir=str(cache_dir), k=K, vocab_size=vocab,
                      features=("aux",), feature_dims={"aux": 3 * hidden}, aux_layers=aux,
                      token_budget=batch * length, threads=min(8, os.cpu_count() or 1), device=device)
    identity = {"gpu_check": name, "shape": list(shape), "k": K}
    manifest = create_manifest(cache_dir, key=content_key(identity), identity=identity, k=K, vocab_size=vocab,
                               tokenizer_sha256="0" * 64, features={"aux": {"dim": 3 * hidden, "layers": list(aux)}},
                               num_shards_planned=args.shards + 1)
    load_started = time.perf_counter()
    worker = TargetWorker(spec)
    load_s = time.perf_counter() - load_started
    model = worker.model
    shard_samples = [random_samples(2 * batch, length, vocab, seed=s, prefix=f"shard{s}") for s in range(args.shards)]
    target_topk(model, shard_samples[0][:batch], K, ("aux",), aux)  # warm-up: kernels, cuBLAS handles

    # the worker path as its Ray actor runs it: SHARDS_IN_FLIGHT shards at once, two batches per shard,
    # encoding and commit of one shard alongside the next one's forward
    sync(device)
    worker_started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=SHARDS_IN_FLIGHT) as pool:
        results = list(pool.map(worker.run_shard, [ShardTask(i, tuple(s)) for i, s in enumerate(shard_samples)]))
    worker_wall = time.perf_counter() - worker_started
    for result in results:
        manifest.record_shard(result["info"])
    shard_runs = [{"seconds": r["seconds"], "compute_s": r["compute_seconds"], "write_s": r["write_seconds"]}
                  for r in results]
    worker_positions = sum(int(s.loss_mask[1:].sum()) for samples in shard_samples for s in samples)

    one_batch = shard_samples[1][:batch]
    positions = sum(int(s.loss_mask[1:].sum()) for s in one_batch)
    times = {  # the honest limit: backbone + LM head at the trained positions only
        "bare_forward_s": median_time(lambda: bare_forward(model, one_batch), device, args.repeats),
        "topk_s": median_time(lambda: target_topk(model, one_batch, K), device, args.repeats),
        "topk_aux_s": median_time(lambda: target_topk(model, one_batch, K, ("aux",), aux), device, args.repeats),
    }
    computed = target_topk(model, one_batch, K, ("aux",), aux)
    # the last shard: the in-memory result through CacheWriter; the others came from the worker
    from cache import SequenceRecord

    writer = CacheWriter(cache_dir, k=K, vocab_size=vocab, features=("aux",), feature_dims={"aux": 3 * hidden})
    records = [SequenceRecord(f"direct:{s.sample_id}", s.input_ids, s.loss_mask, ids, logprobs, feats)
               for s, (ids, logprobs, feats) in zip(one_batch, computed)]
    manifest.record_shard(writer.write_shard(args.shards, records))
    manifest.finalize()

    reader = open_cache(cache_dir)
    problems = reader.verify()
    stored = {r.sample_id: r for r in reader.iter_sequences(columns=["aux"])}
    ids_equal = all(np.array_equal(stored[f"direct:{s.sample_id}"].topk_ids, ids)
                    for s, (ids, _, _) in zip(one_batch, computed))
    logprob_err = max(float(np.abs(stored[f"direct:{s.sample_id}"].topk_logprobs - lp).max())
                      for s, (_, lp, _) in zip(one_batch, computed))
    aux_err = max(float(np.abs(stored[f"direct:{s.sample_id}"].features["aux"] - f["aux"]).max()
                        / max(1.0, float(np.abs(f["aux"]).max())))
                  for s, (_, _, f) in zip(one_batch, computed))

    # independent reference: the full model's logits, fp32 log_softmax, top-k at the trained positions
    with torch.inference_mode():
        agree, lp_diff, total = 0, 0.0, 0
        for sample in one_batch:
            logits = model(input_ids=torch.from_numpy(sample.input_ids.astype(np.int64))[None].to(device)).logits[0]
            cols = torch.from_numpy(np.flatnonzero(sample.loss_mask[1:])).to(device)
            ref_lp, ref_ids = torch.log_softmax(logits[cols].float(), dim=-1).topk(K, dim=-1)
            row = stored[sample.sample_id] if sample.sample_id in stored else stored[f"direct:{sample.sample_id}"]
            mine = torch.from_numpy(row.topk_ids[:, 0].astype(np.int64)).to(device)
            agree += int((mine == ref_ids[:, 0]).sum())
            lp_diff = max(lp_diff, float((torch.from_numpy(row.topk_logprobs[:, 0]).to(device) - ref_lp[:, 0])
                                         .abs().max()))
            total += len(cols)
    del logits
    manifest_data = reader.manifest
    ok = not problems and ids_equal and logprob_err < 2e-2 and agree / total > 0.95
    return {
        "ok": ok,
        "model_load_s": load_s,
        "sequences": manifest_data["num_sequences"], "positions": manifest_data["num_positions"],
        "batch": [batch, length], "batch_positions": positions,
        **times,
        "bare_forward_tok_per_s": batch * length / times["bare_forward_s"],
        "topk_pos_per_s": positions / times["topk_s"],
        "topk_aux_pos_per_s": positions / times["topk_aux_s"],
        "build_vs_forward": times["bare_forward_s"] / times["topk_s"],  # same batch: throughput ratio
        "build_aux_vs_forward": times["bare_forward_s"] / times["topk_aux_s"],
        "worker_shards": shard_runs,
        "worker_wall_s": worker_wall,
        # host encoding and commit included: the whole worker path over the shards vs the bare rate
        "worker_vs_forward": (worker_positions / worker_wall) / (positions / times["bare_forward_s"]),
        "readback": {"verify_problems": problems, "topk_ids_equal": ids_equal, "max_logprob_err": logprob_err,
                     "max_aux_rel_err": aux_err},
        "vs_full_forward": {"top1_agreement": agree / total, "max_top1_logprob_diff": lp_diff},
        "cache_bytes_per_position": sum(sum(i.bytes.values()) for i in manifest_data.shard_infos())
        / max(1, manifest_data["num_positions"]),
        "peak_gib": peak_gib(device),
        "cache_dir": str(cache_dir),
        "wall_s": time.perf_counter() - started,
    }


def check_syncs(args) -> dict:
    """CUDA host synchronizations in one build batch (launch_topk) and one KL / LK^λ loss step (torch's sync debug mode)."""
    import warnings

    from pipeline.target_pass import launch_topk
    from trainer.losses import SparseTarget, compute_loss

    if args.device != "cuda":
        return {"ok": True, "skipped": "torch counts synchronizations on CUDA only; on a CPU, "
                                       "tests/trainer/test_losses_sync.py counts the losses' host reads"}
    shape = (QUICK_SHAPES if args.quick else SHAPES)["smollm2-135m"]
    model = random_model(shape, "cuda", args.dtype)
    samples = random_samples(args.batch, args.length, shape[6], seed=9, prefix="sync")
    launch_topk(model, samples, K).result()  # warm-up

    def sites(fn) -> list[str]:
        """file:line of every synchronizing CUDA call fn makes."""
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]

    build = sites(lambda: launch_topk(model, samples, K))
    n, vocab = args.loss_n, shape[6]
    logits = torch.randn(n, vocab, device="cuda", dtype=torch_dtype(args.dtype), requires_grad=True)
    ids = torch.rand(n, vocab, device="cuda").topk(K, dim=-1).indices
    logprobs = torch.log_softmax(torch.randn(n, vocab, device="cuda"), -1).gather(1, ids).sort(-1, True).values

    def step(loss: str):
        logits.grad = None
        compute_loss(loss, logits, SparseTarget(ids, logprobs)).loss.backward()

    losses = {}
    for loss in ("kl", "lk_lambda"):
        step(loss)
        losses[loss] = sites(lambda: step(loss))
    return {"ok": True, "build_batch_syncs": len(build), "build_sync_sites": sorted(set(build)),
            "loss_step_syncs": {loss: len(found) for loss, found in losses.items()},
            "loss_sync_sites": {loss: sorted(set(found)) for loss, found in losses.items()}}


# ---------------------------------------------------------------------------------- 2. training
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plan(cache_dir: str, runs_dir: Path, loss: str, args):
    """A RunPlan built directly (plan_run needs a tokenizer; these caches come from random models)."""
    from cache import open_cache
    from trainer.config import RunPlan, TrainConfig
    from trainer.data import heldout_split, scan_index
    from trainer.drafters import resolve_drafter_spec

    config = TrainConfig(cache=cache_dir, out=str(runs_dir), loss=loss, drafter="tiny", run_name=loss,
                         steps=args.train_steps, workers=1, zero=2, dtype=args.dtype, warmup=5,
                         batch_tokens=args.batch * args.length,
                         eval_sequences=8, eval_every=0, checkpoint_every=0, prefetch_batches=4)
    config.validate()
    reader = open_cache(cache_dir)
    manifest = reader.manifest
    index = scan_index(reader)
    split = heldout_split(index, config.heldout_fraction, config.eval_sequences)
    drafter = resolve_drafter_spec("tiny", {}, vocab_size=manifest["vocab_size"], max_positions=4096,
                                   token_ids={"bos": 1, "eos": 2, "pad": None})
    return RunPlan(config=config, run_dir=str(runs_dir / loss), cache_path=cache_dir, cache_key=manifest["key"],
                   vocab_size=manifest["vocab_size"], k=manifest["k"], tokenizer_sha256=manifest["tokenizer_sha256"],
                   tokenizer_dir=None, drafter=drafter.to_dict(), total_steps=args.train_steps,
                   heldout_threshold=split.heldout_threshold, num_train_sequences=split.num_train,
                   num_heldout_sequences=split.num_heldout, eval_ids=split.eval_ids,
                   eval_shards={str(shard): ids for shard, ids in split.eval_shards.items()})


def check_train(cache_dir: str, args, workdir: Path) -> dict:
    """run_worker for each loss in one process group; per-loss median step time after warm-up steps."""
    import torch.distributed as dist

    from pipeline.train_job import prepare_run_dir
    from trainer.loop import run_worker
    from trainer.rundir import read_metrics, read_run

    device = args.device
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    if device == "cuda":
        torch.cuda.set_device(0)
    runs_dir = workdir / "runs"
    results = {}
    try:
        for loss in TRAIN_LOSSES:
            plan = run_plan(cache_dir, runs_dir, loss, args)
            prepare_run_dir(plan, use_gpu=device == "cuda")
            reset_peak(device)
            started = time.perf_counter()
            summary = run_worker(plan, rank=0, world_size=1)
            wall = time.perf_counter() - started
            metrics = read_metrics(Path(plan.run_dir))
            steady = [m for m in metrics if m["step"] > args.skip_steps] or metrics
            # wall time between consecutive step records: includes the GPU work that step_time_s
            # (measured before the metrics' all-reduce synchronizes) may not have waited for
            gaps = [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:]) if b["step"] > args.skip_steps]
            run = read_run(Path(plan.run_dir)) or {}
            results[loss] = {
                "status": summary["status"], "steps": len(metrics), "wall_s": wall,
                "step_time_s": statistics.median(m["step_time_s"] for m in steady),
                "step_wall_s": statistics.median(gaps) if gaps else None,
                "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
                "data_wait_s": statistics.median(m["data_wait_s"] for m in steady),
                "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
                "heldout_tau": summary["tau"], "dtype": run.get("dtype"),
                "export_check": run.get("export_check"), "peak_gib": peak_gib(device),
            }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ratios = {key: {loss: results[loss][key] / results["kl"][key] for loss in TRAIN_LOSSES}
              for key in ("step_time_s", "step_wall_s") if results["kl"][key]}
    ok = all(r["status"] == "done" and np.isfinite(r["last_loss"]) for r in results.values())
    return {"ok": ok, "runs": results, "vs_kl": ratios}


def check_losses(args) -> dict:
    """bench/losses.py's timing and memory functions in this process, dense and top-k targets."""
    path = ROOT / "bench" / "losses.py"
    module_spec = importlib.util.spec_from_file_location("lkspec_bench_losses", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    make_inputs, made = bench._inputs, {}

    def reused_inputs(*key):
        """bench's inputs, built once per case: random N x V logits take seconds to draw on the CPU."""
        if key not in made:
            made[key] = make_inputs(*key)
        logits, target = made[key]
        logits.grad = None
        return logits, target

    bench._inputs = reused_inputs
    rows = {}
    for target in ("topk", "dense"):
        made.clear()
        common = dict(v=args.loss_vocab, n=args.loss_n, target=target, k=K, dtype=args.dtype, device=args.device,
                      tail="bucket")
        timing = bench.child_time(SimpleNamespace(**common, losses=list(BENCH_LOSSES), repeats=args.repeats))
        for loss in BENCH_LOSSES:
            reset_peak(args.device)
            memory = bench.child_memory(SimpleNamespace(**common, loss=loss))
            rows[f"{target}/{loss}"] = {**timing[loss], "logits_bytes": memory["logits_bytes"],
                                        "extra_mem_vs_logits": memory["extra_bytes"] / memory["logits_bytes"]}
    return {"ok": True, "n": args.loss_n, "vocab": args.loss_vocab, "rows": rows}


# ------------------------------------------------------------------------------------ 3. decode
def check_decode(args) -> dict:
    """Our speculative decoder vs the target alone and vs HF assisted generation, tokens/s."""
    from eval.speculative import speculative_generate

    device = args.device
    shape = (QUICK_SHAPES if args.quick else SHAPES)["smollm2-135m"]
    target = random_model(shape, device, args.dtype)
    drafters = {"self": copy.deepcopy(target), "tiny": tiny_drafter(shape[6], device, args.dtype)}
    prompt = torch.randint(3, shape[6], (32,), generator=torch.Generator().manual_seed(0)).to(device)
    new = args.new_tokens

    def ours(drafter, k, temperature):
        torch.manual_seed(0)
        return speculative_generate(target, drafter, prompt, k=k, temperature=temperature, max_new_tokens=new)

    def hf(drafter, k, temperature):
        torch.manual_seed(0)
        sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if temperature else \
            {"do_sample": False}
        extra = {} if drafter is None else {"assistant_model": drafter, "num_assistant_tokens": k,
                                            "num_assistant_tokens_schedule": "constant"}
        with torch.inference_mode():
            return target.generate(prompt[None], max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                   **sampling, **extra)

    rows, guarded = [], {}
    repeats = max(1, args.repeats - 2)
    temperatures = (0.0, 1.0)
    baseline = {}
    for t in temperatures:
        seconds = median_time(lambda: ours(None, 0, t), device, repeats)
        baseline[t] = new / seconds
        row = {"decoder": "ours", "drafter": "none", "k": 0, "T": t, "tok_per_s": baseline[t]}
        try:
            row["hf_tok_per_s"] = new / median_time(lambda: hf(None, 0, t), device, repeats)
        except Exception as exc:  # noqa: BLE001 - the HF peer is informative, not required
            guarded[f"hf none T={t}"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    greedy = ours(None, 0, 0.0)[0]
    for name, drafter in drafters.items():
        for k in args.draft_k:
            for t in temperatures:
                seconds = median_time(lambda: ours(drafter, k, t), device, repeats)
                output, stats = ours(drafter, k, t)
                row = {"decoder": "ours", "drafter": name, "k": k, "T": t, "tok_per_s": new / seconds,
                       "speedup_vs_target": (new / seconds) / baseline[t], "tau": stats["tau"],
                       "expected_tau": stats["expected_tau"]}
                if t == 0.0:
                    row["equals_greedy"] = bool(torch.equal(output.cpu(), greedy.cpu()))
                try:
                    hf_seconds = median_time(lambda: hf(drafter, k, t), device, repeats)
                    row["hf_tok_per_s"] = new / hf_seconds
                    row["ours_vs_hf"] = hf_seconds / seconds
                except Exception as exc:  # noqa: BLE001
                    guarded[f"hf {name} k={k} T={t}"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
    return {"ok": True, "new_tokens": new, "rows": rows, "hf_errors": guarded, "peak_gib": peak_gib(device)}


# --------------------------------------------------------------------------------------- driver
def guarded(name: str, fn, report: dict, args) -> dict:
    """Run one part; record its result or its traceback and its wall time; rewrite gpu_check.json."""
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - one failing part must not stop the others
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(result["traceback"], file=sys.stderr, flush=True)
    result["part_s"] = time.perf_counter() - started
    report["parts"][name] = result
    print(f"   {'ok' if result.get('ok') else 'FAILED'} in {result['part_s']:.1f} s", flush=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    write_report(report, args.out)  # a run killed later still leaves the parts done so far
    return result


def write_report(report: dict, out: Path) -> None:
    """OUT/gpu_check.json: every part recorded so far."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


def fmt(value, digits: int = 2) -> str:
    """A table cell: thousands separators for floats, - for missing values."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(report: dict) -> str:
    """The headline numbers as Markdown."""
    lines = [f"# gpu_check on {report['device_name']} ({report['device']}, torch {report['torch']}, "
             f"{report['precision']['dtype']})", ""]
    parts = report["parts"]
    for name, part in parts.items():
        if not part.get("ok"):
            lines.append(f"**{name}: FAILED** {part.get('error', '')[:300]}")
    lines += ["", "| build (bare = backbone + LM head at trained positions) | bare tok/s | topk pos/s | topk+aux pos/s | "
                  "build÷bare | +aux ÷bare | worker (aux, host encode, 2 shards in flight) ÷bare | top-1 agree | B/pos |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in SHAPES:
        p = parts.get(f"build {name}", {})
        if "build_vs_forward" in p:
            lines.append(f"| {name} | {fmt(p['bare_forward_tok_per_s'], 0)} | {fmt(p['topk_pos_per_s'], 0)} | "
                         f"{fmt(p['topk_aux_pos_per_s'], 0)} | {fmt(p['build_vs_forward'])} | "
                         f"{fmt(p['build_aux_vs_forward'])} | {fmt(p['worker_vs_forward'])} | "
                         f"{fmt(p['vs_full_forward']['top1_agreement'], 4)} | "
                         f"{fmt(p['cache_bytes_per_position'], 1)} |")
    syncs = parts.get("syncs", {})
    if "loss_step_syncs" in syncs:
        lines += ["", f"CUDA synchronizations: one build batch {syncs['build_batch_syncs']} "
                      f"({', '.join(syncs['build_sync_sites']) or 'none'}); one loss step "
                      + ", ".join(f"{loss} {count}" for loss, count in syncs["loss_step_syncs"].items())]
    train = parts.get("train", {})
    if "runs" in train:
        lines += ["", "| train loss | step s | ÷ KL | step wall s | ÷ KL | tok/s | peak GiB | dtype | "
                  "loss first→last |", "|---|---|---|---|---|---|---|---|---|"]
        ratios = train["vs_kl"]
        for loss, r in train["runs"].items():
            lines.append(f"| {loss} | {fmt(r['step_time_s'], 4)} | {fmt(ratios['step_time_s'][loss], 3)} | "
                         f"{fmt(r['step_wall_s'], 4)} | {fmt(ratios.get('step_wall_s', {}).get(loss), 3)} | "
                         f"{fmt(r['tokens_per_s'], 0)} | {fmt(r['peak_gib'])} | {r['dtype']} | "
                         f"{fmt(r['first_loss'], 3)}→{fmt(r['last_loss'], 3)} |")
    losses = parts.get("losses", {})
    if "rows" in losses:
        lines += ["", f"| loss N={losses['n']} V={losses['vocab']} | fwd+bwd s | ÷ KL | extra mem ÷ logits |",
                  "|---|---|---|---|"]
        for key, r in losses["rows"].items():
            lines.append(f"| {key} | {fmt(r['wall_s'], 4)} | {fmt(r['time_vs_kl'], 3)} | "
                         f"{fmt(r['extra_mem_vs_logits'])} |")
    decode = parts.get("decode", {})
    if "rows" in decode:
        lines += ["", "| decode | K | T | tok/s | ÷ target alone | τ | HF tok/s | ours ÷ HF | = greedy |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in decode["rows"]:
            lines.append(f"| {r['drafter']} | {r['k']} | {r['T']:g} | {fmt(r['tok_per_s'], 1)} | "
                         f"{fmt(r.get('speedup_vs_target'))} | {fmt(r.get('tau'))} | {fmt(r.get('hf_tok_per_s'), 1)} | "
                         f"{fmt(r.get('ours_vs_hf'))} | {fmt(r.get('equals_greedy'))} |")
    lines += ["", "part times: " + ", ".join(f"{n} {p['part_s']:.0f} s" for n, p in parts.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps (a CPU check of the logic)")
    parser.add_argument("--parts", default="build,syncs,train,losses",
                        help="comma-separated subset of build,syncs,train,losses,decode (the default fits 8 minutes "
                             "on one H200)")
    add_precision_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    precision = precision_from_args(parser, args, args.device)
    args.dtype = precision["dtype"]  # fp32 or bf16 from here on
    quick = args.quick
    args.batch, args.length = (4, 64) if quick else (16, 512)  # one token-budget batch: 8192 tokens
    args.repeats = 2 if quick else 5
    args.train_steps, args.skip_steps = (6, 2) if quick else (40, 10)  # steady-state medians, warm-up skipped
    args.shards = 3 if quick else 6
    args.loss_n, args.loss_vocab = (256, 49152) if quick else (8192, 151936)
    args.new_tokens = 16 if quick else 64
    args.draft_k = (4,) if quick else (4, 7)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    wanted = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "quick": quick, "torch": torch.__version__, "precision": precision,
              "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "parts": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lkspec-gpu-check-") as tmp:
        workdir = Path(tmp)
        shapes = QUICK_SHAPES if quick else SHAPES
        if "build" in wanted:
            for name, shape in shapes.items():
                guarded(f"build {name}", lambda: check_build(name, shape, args, workdir), report, args)
        if "syncs" in wanted:
            guarded("syncs", lambda: check_syncs(args), report, args)
        if "train" in wanted:
            cache_dir = report["parts"].get("build smollm2-135m", {}).get("cache_dir")
            if cache_dir:
                guarded("train", lambda: check_train(cache_dir, args, workdir), report, args)
            else:
                report["parts"]["train"] = {"ok": False, "error": "no SmolLM2-shaped cache from the build part",
                                            "part_s": 0.0}
        if "losses" in wanted:
            guarded("losses", lambda: check_losses(args), report, args)
        if "decode" in wanted:
            guarded("decode", lambda: check_decode(args), report, args)
    report["wall_s"] = time.perf_counter() - started
    write_report(report, args.out)
    text = table(report)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text, flush=True)
    return 0 if all(p.get("ok") for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
