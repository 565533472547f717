"""The training recipe each data-parallel worker runs (DeepSpeed ZeRO; launched by pipeline.train_job).

    plan -> drafter -> deepspeed.initialize -> [resume] -> for each step:
        batch (prefetched) -> draft logits per step -> loss vs target (cache top-k | online target)
        -> backward, step -> metrics (all-reduced) -> [held-out eval, best export] -> [checkpoint]
    -> final export (model/) and run.json

Held-out expected τ: for one draft step it is the chain estimate 1 + Σ_{k≤K} ᾱ^k with ᾱ the
held-out mean acceptance and K = tau_draft_len (7); drafters with n steps use ᾱ_1..ᾱ_n and repeat
ᾱ_n up to K. Held-out α is reported with the cache's tail as one bucket ("alpha", exact for the
coarsened distributions, an upper bound of the true α) and with the tail dropped ("alpha_lower", a
lower bound), whatever tail the run trains with, and with --exact-heldout (or online targets) also
against the target's full distribution ("alpha_exact"). Each evaluation also writes its per-sequence
sums to heldout.json (trainer.heldout); the last one becomes run.json's `heldout` measurement. A
finished run resumed with --exact-heldout (plan.rescore_exact) only evaluates its final checkpoint again.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cache import open_cache
from trainer.checkpoint import CHECKPOINTS_DIR, export_drafter, load_checkpoint, save_checkpoint
from trainer.config import RunPlan, TrainConfig
from trainer.data import Batch, BatchStream, DataPosition, LoaderSpec, eval_batches
from trainer.drafters import DraftStep, DrafterSpec, build_drafter
from trainer.heldout import QUANTITIES, HeldoutSums, acceptance_summary, write_heldout
from trainer.losses import DenseTarget, SparseTarget, combine_steps, compute_loss, expected_tau, kl_alpha
from trainer.precision import torch_dtype
from trainer.rundir import MetricsLogger, read_run, update_run

# Max |Δlogit| between the trained module and its reloaded export (every draft step), relative to max(1, max |logit|):
# a few rounding units of the training precision (a wrong export is off by the logits' own size).
EXPORT_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


class ExportError(RuntimeError):
    """The exported drafter does not reproduce the trained module's logits."""


# ------------------------------------------------------------------------------- components
def deepspeed_config(config: TrainConfig, dtype: str) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage, AdamW (torch's fused kernel), clipping, precision.

    fused: one kernel per parameter tensor instead of foreach's temporaries the size of the parameters
    (on a 2-core AVX2 CPU, an MLP speculator's step over its 28M-entry embedding: 0.30 s -> 0.03 s).
    """
    return {
        "train_micro_batch_size_per_gpu": 1,  # one token-budget batch per worker and step
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": config.lr, "betas": [config.adam_beta1, config.adam_beta2], "eps": 1e-8,
            "weight_decay": config.weight_decay, "torch_adam": True, "fused": True}},
        "zero_optimization": {"stage": config.zero},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(total_steps: int, warmup: int):
    """LR multiplier of optimizer step s (0-based): linear warm-up to 1 over `warmup` steps, then cosine to 0."""
    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return multiplier


def select_rows(target: DenseTarget | SparseTarget, rows: Tensor | None):
    """The target restricted to one draft step's rows (all rows when None)."""
    if rows is None:
        return target
    if isinstance(target, SparseTarget):
        return SparseTarget(target.ids[rows], target.logprobs[rows])
    return DenseTarget(logits=target.logits[rows])


class TargetSource:
    """Targets of a batch: the cached top-k (`cache`) or the target model's full distribution (`online`)."""

    def __init__(self, source: str, target_path: str | None, dtype: str, device: torch.device):
        self.model = None
        if source == "online":
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(
                target_path, dtype=torch_dtype(dtype), trust_remote_code=False).to(device).eval()
            self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> DenseTarget | SparseTarget:
        if self.model is None:
            return SparseTarget(batch.topk_ids, batch.topk_logprobs)
        hidden = self.model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          use_cache=False).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[batch.target_batch, batch.target_pos])  # [N, V]
        return DenseTarget(logits=logits)


def _record_rescore(engine, plan: RunPlan, sums: HeldoutSums, rank: int) -> dict[str, Any]:
    """Collective: write a finished run's new final evaluation (heldout.json, run.json's `heldout` and
    `final.eval`, a `rescored` time), leaving the rest of run.json as the training wrote it."""
    run_dir, draft_len = Path(plan.run_dir), plan.config.tau_draft_len
    record = sums.record(draft_len)
    if rank == 0:
        write_heldout(run_dir, sums, draft_len)
        run = read_run(run_dir) or {}
        update_run(run_dir, final={**(run.get("final") or {}), "eval": record},
                   heldout={**(run.get("heldout") or {}), **acceptance_summary(record, draft_len)},
                   rescored=time.time())
    engine.destroy()
    dist.barrier()
    return {"status": "done", "steps_done": plan.total_steps, "tau": record["tau"]}


def _all_reduce(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _dummy_batch(k: int, feature_dims: dict[str, int], columns) -> Batch:
    """A 2-token batch for ranks with no held-out data: ZeRO-3 needs every rank in every forward."""
    return Batch(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
                 target_batch=torch.zeros(1, dtype=torch.long), target_pos=torch.zeros(1, dtype=torch.long),
                 topk_ids=torch.arange(k, dtype=torch.long)[None], topk_logprobs=torch.full((1, k), -math.log(k)),
                 sample_ids=[], features={c: torch.zeros(1, 2, feature_dims[c]) for c in columns})


def step_record(step: int, results: list, loss: Tensor, batch: Batch, *, elapsed: float, data_wait: float,
                lr: float, config: TrainConfig, world_size: int, device) -> dict[str, Any]:
    """Collective: one step's metrics over every worker (target-weighted means, slowest worker's time)."""
    num_steps = len(results)
    local = [float(loss.detach()) * float(results[0].n_valid), float(results[0].n_valid), float(batch.num_tokens)]
    local += [float(r.alpha_mean) * float(r.n_valid) for r in results]
    local += [float(r.kl_mean) * float(r.n_valid) for r in results]
    local += [float(r.n_valid) for r in results]
    local += [float(r.lam) if r.lam is not None else 0.0 for r in results]
    summed = _all_reduce(local, device)
    slowest, slowest_wait = _all_reduce([elapsed, data_wait], device, dist.ReduceOp.MAX)
    alpha_sums, kl_sums, counts, lams = (summed[3 + i * num_steps:3 + (i + 1) * num_steps] for i in range(4))
    alpha = [a / max(c, 1.0) for a, c in zip(alpha_sums, counts)]
    return {
        "step": step,
        "loss": summed[0] / max(summed[1], 1.0),
        "alpha": alpha,
        "kl": [x / max(c, 1.0) for x, c in zip(kl_sums, counts)],
        "lam": [x / world_size for x in lams] if config.loss == "lk_lambda" else None,
        "tau": expected_tau(alpha, config.tau_draft_len),
        "lr": lr,
        "tokens": int(summed[2]),
        "targets": int(summed[1]),
        "tokens_per_s": summed[2] / slowest,
        "step_time_s": slowest,
        "data_wait_s": slowest_wait,
        "time": time.time(),
    }


def evaluate(engine, batches: list[Batch], dummy: Batch, targets: TargetSource, eval_ids: list[str], step: int,
             device, exact: TargetSource | None = None) -> HeldoutSums:
    """Collective: per held-out sequence and draft step, Σα (tail dropped / bucket), ΣKL and positions, all ranks;
    also Σα against `exact`'s full target distribution when given (the exact α, between the two bounds)."""
    num_batches = int(_all_reduce([len(batches)], device, dist.ReduceOp.MAX)[0])
    vocab_map = getattr(engine.module, "vocab_map", None)
    index = {sample_id: i for i, sample_id in enumerate(eval_ids)}
    quantities = len(QUANTITIES) + (1 if exact is not None else 0)
    sums = torch.zeros(quantities, len(eval_ids), engine.module.num_steps, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for i in range(num_batches):
            batch = (batches[i] if i < len(batches) else dummy).to(device)
            steps: list[DraftStep] = engine(batch.model_inputs())
            if i >= len(batches):
                continue
            target = targets(batch)
            full = exact(batch) if exact is not None and exact is not targets else None
            sequence = torch.tensor([index[sid] for sid in batch.sample_ids], device=device)[batch.target_batch]
            for n, draft in enumerate(steps):
                step_target = select_rows(target, draft.rows)
                rows = sequence if draft.rows is None else sequence[draft.rows]  # [N_n] held-out sequence index
                kl, alpha_bucket, _ = kl_alpha(draft.logits, step_target, tail="bucket", vocab_map=vocab_map)
                alpha_drop = alpha_bucket  # a full distribution has no tail: both modes agree
                if isinstance(step_target, SparseTarget):
                    _, alpha_drop, _ = kl_alpha(draft.logits, step_target, tail="drop", vocab_map=vocab_map)
                values = [alpha_drop, alpha_bucket, kl, torch.ones_like(kl)]
                if full is not None:
                    values.append(kl_alpha(draft.logits, select_rows(full, draft.rows), vocab_map=vocab_map)[1])
                elif exact is not None:  # the targets are the full distribution already
                    values.append(alpha_bucket)
                for q, value in enumerate(values):
                    sums[q, :, n].index_add_(0, rows, value.to(torch.float64))
    engine.train()
    dist.all_reduce(sums)  # each rank filled the rows of its own sequences
    return HeldoutSums(sample_ids=list(eval_ids), sums=sums.cpu().numpy(), step=step)


def probe_inputs(vocab_size: int, seed: int, feature_dims: dict[str, int] | None = None) -> Batch:
    """A fixed random 2×16 batch scoring every position (random features too): trained module vs its export."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2, 16), generator=generator)
    rows_b, rows_t = torch.meshgrid(torch.arange(2), torch.arange(16), indexing="ij")
    features = {name: torch.randn(2, 16, dim, generator=generator) for name, dim in (feature_dims or {}).items()}
    return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), target_batch=rows_b.reshape(-1),
                 target_pos=rows_t.reshape(-1), topk_ids=torch.zeros(32, 1, dtype=torch.long),
                 topk_logprobs=torch.zeros(32, 1), sample_ids=[], features=features)


def check_export(engine, model_dir: Path, plan: RunPlan, feature_dims: dict[str, int], dtype: str,
                 device) -> dict[str, Any]:
    """Collective: reload the export (Drafter.reload); compare every draft step's logits with the trained module's."""
    from safetensors.torch import save_file

    probe = probe_inputs(plan.vocab_size, plan.config.seed, {c: feature_dims[c] for c in plan.columns})
    engine.eval()
    with torch.no_grad():
        trained = [s.logits.float().cpu() for s in engine(probe.to(device).model_inputs())]  # per step [N_n, V]
    engine.train()
    result: dict[str, Any] = {}
    if dist.get_rank() == 0:
        reloaded = engine.module.reload(model_dir, torch_dtype(dtype)).to(device)
        with torch.no_grad():
            logits = [s.logits.float().cpu() for s in reloaded(probe.to(device).model_inputs())]
        if [x.shape for x in logits] != [x.shape for x in trained]:
            raise ExportError(f"{model_dir} reloads with step logits of shapes {[tuple(x.shape) for x in logits]}, "
                              f"the trained module gives {[tuple(x.shape) for x in trained]}")
        diff = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(logits, trained))
        save_file({"input_ids": probe.input_ids.contiguous(), "logits": trained[0].contiguous(),
                   **{name: value.contiguous() for name, value in probe.features.items()}},
                  str(Path(plan.run_dir) / "export_probe.safetensors"))
        tolerance = EXPORT_TOLERANCE[dtype] * max(1.0, max(float(x.abs().max()) for x in trained if x.numel()))
        result = {"max_abs_diff": diff, "tolerance": tolerance, "steps": len(trained)}
        if not diff <= tolerance:
            raise ExportError(f"{model_dir} reloads with logits {diff:.3g} away from the trained module")
    dist.barrier()
    return result


# ---------------------------------------------------------------------------------- the recipe
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: run the planned runs one after the other on this worker, then leave cleanly.

    A sweep shares one worker group: the workers start, import and join the process group once.
    """
    import ray.train

    flush_subnormals()  # first: before torch starts its intra-op threads
    context = ray.train.get_context()
    try:
        for plan_dict in loop_config["plans"]:
            summary = run_worker(RunPlan.from_dict(plan_dict), rank=context.get_world_rank(),
                                 world_size=context.get_world_size())
            ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    finally:
        # gloo workers abort at interpreter exit ("terminate called without an active exception")
        # unless the process group is gone first.
        if dist.is_initialized():
            dist.destroy_process_group()


def flush_subnormals() -> None:
    """Read and write subnormal floats (< 1.2e-38 in fp32) as 0 on x86 (FTZ/DAZ, as GPUs do).

    Each subnormal operand costs an x86 core a microcode assist, and a draft whose logits spread wide
    (LK^α does within a few dozen steps) fills its softmaxes with them. The flag is per thread, and
    threads inherit it when created: call this before the process's first parallel torch operation.
    """
    torch.set_flush_denormal(True)


def skip_shm_comm_build(deepspeed) -> None:
    """Keep DeepSpeed from compiling its shared-memory C++ op (`deepspeed_shm_comm`) on a CPU.

    DeepSpeed builds it on its first process group (29-160 s of g++ on 2 cores, redone whenever another
    environment's build replaced the one in ~/.cache/torch_extensions), but only its
    `inference_all_reduce` uses it; training reduces through torch.distributed (gloo here).
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def run_worker(plan: RunPlan, *, rank: int, world_size: int) -> dict[str, Any]:
    """Train (or resume) the planned run on this rank of an initialized process group."""
    import deepspeed

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    skip_shm_comm_build(deepspeed)
    config = plan.config
    run_dir = Path(plan.run_dir)
    started = time.time()
    dtype = config.resolved_dtype("cuda" if torch.cuda.is_available() else "cpu")  # this worker's device decides
    if rank == 0 and not plan.rescore_exact:
        update_run(run_dir, status="running", started=started, dtype=dtype)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                           f"expected {rank} of {world_size}")

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    reader = open_cache(plan.cache_path)
    drafter = build_drafter(DrafterSpec.from_dict(plan.drafter))
    schedule = warmup_cosine(plan.total_steps, config.warmup)
    engine, _, _, scheduler = deepspeed.initialize(
        model=drafter,
        model_parameters=[p for p in drafter.parameters() if p.requires_grad],
        config=deepspeed_config(config, dtype),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    device = engine.device
    timings = {"setup_s": time.time() - started}
    targets = TargetSource(config.target_source, plan.target_path, dtype, device)
    # The exact held-out α: a run trained online scores against the full distribution anyway; otherwise
    # (--exact-heldout) the target model is loaded at the first evaluation.
    exact = targets if config.target_source == "online" else None

    checkpoint_dir = run_dir / CHECKPOINTS_DIR
    restored = load_checkpoint(engine, checkpoint_dir) if config.resume else None
    start = restored.step if restored else 0
    state = dict(restored.client_state) if restored else {}
    best, last_eval, last_train = state.get("best"), state.get("last_eval"), state.get("last_train")

    spec = LoaderSpec(rank=rank, world_size=world_size, seed=config.seed, batch_tokens=config.batch_tokens,
                      heldout_threshold=plan.heldout_threshold, pool_sequences=config.pool_sequences,
                      columns=tuple(plan.columns))
    held_out = eval_batches(reader, spec, plan.eval_shards, plan.eval_ids)
    feature_dims = {name: spec_["dim"] for name, spec_ in reader.manifest["features"].items()}
    dummy = _dummy_batch(plan.k, feature_dims, plan.columns)
    if plan.rescore_exact:
        if start != plan.total_steps:
            raise RuntimeError(f"{run_dir}: rescoring needs the checkpoint of step {plan.total_steps}, found {start}")
        exact = TargetSource("online", plan.target_path, dtype, device)
        sums = evaluate(engine, held_out, dummy, targets, plan.eval_ids, start, device, exact)
        return _record_rescore(engine, plan, sums, rank)
    stream = BatchStream(reader, spec, restored.position if restored else DataPosition(), config.prefetch_batches)
    logger = MetricsLogger(run_dir, enabled=rank == 0, resume_step=start)
    stop = min(plan.total_steps, config.stop_after or plan.total_steps)
    vocab_map = getattr(drafter, "vocab_map", None)
    timings["data_setup_s"] = time.time() - started - timings["setup_s"]
    loop_started = time.time()
    try:
        engine.train()
        for step in range(start + 1, stop + 1):
            began = time.perf_counter()
            batch = next(stream)
            data_wait = time.perf_counter() - began
            batch = batch.to(device)
            draft_steps: list[DraftStep] = engine(batch.model_inputs())
            target = targets(batch)
            results = [compute_loss(config.loss, s.logits, select_rows(target, s.rows), eta=config.eta,
                                    tail=config.tail, vocab_map=vocab_map) for s in draft_steps]
            loss = results[0].loss if len(results) == 1 else combine_steps(results)
            engine.backward(loss)
            lr = float(scheduler.get_last_lr()[0])
            engine.step()
            elapsed = time.perf_counter() - began

            record = step_record(step, results, loss, batch, elapsed=elapsed, data_wait=data_wait, lr=lr,
                                 config=config, world_size=world_size, device=device)
            record["epoch"] = stream.position.epoch
            last_train = {k: v for k, v in record.items() if k != "time"}
            if (config.eval_every and step % config.eval_every == 0) or step == plan.total_steps:
                if exact is None and config.exact_heldout:
                    exact = TargetSource("online", plan.target_path, dtype, device)
                sums = evaluate(engine, held_out, dummy, targets, plan.eval_ids, step, device, exact)
                last_eval = sums.record(config.tau_draft_len)
                record["eval"] = last_eval
                if rank == 0:
                    write_heldout(run_dir, sums, config.tau_draft_len)
                if best is None or last_eval["tau"] > best["tau"]:
                    best = {"step": step, **last_eval}
                    export_drafter(engine, run_dir / "best", plan.tokenizer_dir)
            logger.log(record)
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == stop:
                save_checkpoint(engine, checkpoint_dir, step=step, position=stream.position,
                                client_state={"best": best, "last_eval": last_eval, "last_train": last_train},
                                keep=config.keep_checkpoints)
    finally:
        stream.close()
        logger.close()

    timings["loop_s"] = time.time() - loop_started
    finished = stop == plan.total_steps
    export_check = None
    if finished:
        export_started = time.time()
        export_drafter(engine, run_dir / "model", plan.tokenizer_dir)
        export_check = check_export(engine, run_dir / "model", plan, feature_dims, dtype, device)
        timings["export_s"] = time.time() - export_started
    summary = {
        "status": "done" if finished else "stopped",
        "steps_done": stop,
        "loss": last_train["loss"] if last_train else None,
        "tau": last_eval["tau"] if last_eval else None,
        "best_tau": best["tau"] if best else None,
        "best_step": best["step"] if best else None,
    }
    engine.destroy()  # release DeepSpeed's hooks and buffers before the next run of a sweep
    del engine, drafter, targets, exact
    if rank == 0:
        update_run(run_dir, status=summary["status"], steps_done=stop,
                   final={"train": last_train, "eval": last_eval}, best=best,
                   model_dir=str(run_dir / "model") if finished else None,
                   best_dir=str(run_dir / "best") if best else None,
                   heldout={**((read_run(run_dir) or {}).get("heldout") or {}),
                            **(acceptance_summary(last_eval, config.tau_draft_len) if last_eval else {})},
                   export_check=export_check, finished=time.time(), dtype=dtype,
                   worker_wall_time_s=time.time() - started, worker_timings=timings)
    dist.barrier()
    return summary
