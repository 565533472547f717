"""The target pass of one shard: teacher-forced forward, top-k log-probs, features, shard commit.

`TargetWorker` is the Ray actor; the functions it calls are plain and also serve benchmarks and tests.
A worker holds one shard on the model while the previous shard is encoded and written (a threaded
actor, two shards in flight), and within a shard it queues the next batch's forward before it reads
the previous batch's results back: on a GPU nothing in the loop waits for the device except that read.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

LOGITS_CHUNK = 1024  # positions per lm_head + top-k chunk: bounds memory at chunk * vocab * 4 bytes
SHARDS_IN_FLIGHT = 2  # per worker: one on the model, one being encoded and written


class BuildError(RuntimeError):
    """The build cannot go on (a user-facing message; committed shards are kept for a rerun)."""


class NonFiniteLogitsError(BuildError):
    """The target produced NaN or inf logits."""


@dataclass(frozen=True)
class Sample:
    """One sequence to run: tokens and assistant mask (and, to regenerate, its conversation)."""

    sample_id: str
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    messages: tuple[dict, ...] | None = None  # set only with --regenerate


@dataclass(frozen=True)
class ShardTask:
    """The unit of work of a TargetWorker: one shard's samples in dataset order."""

    index: int
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a TargetWorker needs; identical for every worker of a build."""

    model_path: str
    dtype: str
    cache_dir: str
    k: int
    vocab_size: int
    features: tuple[str, ...] = ()
    feature_dims: dict = field(default_factory=dict)
    aux_layers: tuple[int, ...] = ()
    token_budget: int = 8192
    threads: int = 1
    regenerate: bool = False
    max_new_tokens: int = 256
    max_length: int = 1024
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda" (resolved by the driver)
    gpus: int = 1  # GPUs a cuda worker holds; > 1 splits the target over them (accelerate device map)
    max_memory_bytes: int = 0  # weight budget per GPU for the device map (pipeline.plan.plan_placement)


def aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high layers as indices into `hidden_states` (index i = input of layer i)."""
    return (min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 1))


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Deterministic length-bucketed batches: sort by length, fill while rows * longest <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(samples: Sequence[Sample]):
    """Right-padded input ids and attention mask `[batch, max_len]` (int64) of a batch of samples."""
    import torch

    lengths = [len(s.input_ids) for s in samples]
    input_ids = torch.zeros((len(samples), max(lengths)), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for b, sample in enumerate(samples):
        input_ids[b, : lengths[b]] = torch.from_numpy(sample.input_ids.astype(np.int64))
        attention[b, : lengths[b]] = 1
    return input_ids, attention


def topk_logprobs(logits, k: int):
    """Top-k log-probs and ids `[c, k]` of fp32 logits `[c, V]` (overwritten), and per-row finiteness `[c]`.

    Top-k of the raw logits, then log p = (z − max) − log Σ_V exp(z − max): the log-softmax of the
    k kept entries without writing a log-softmax over V. A row with a NaN or +inf logit, or fewer
    than k finite ones, is not finite.
    """
    import torch

    values, ids = torch.topk(logits, k, dim=-1)
    top = values[:, :1]  # the row max (NaN first when present)
    log_sum = logits.sub_(top).exp_().sum(-1, keepdim=True).log_()
    logprobs = (values - top).sub_(log_sum)
    return logprobs, ids, torch.isfinite(logprobs).all(-1)


@contextlib.contextmanager
def layer_inputs(model, layers: Sequence[int]) -> Iterator[dict]:
    """Capture the hidden states entering decoder layers `layers` (= HF `hidden_states[i]`) during a forward.

    Only those layers are kept, where `output_hidden_states` would keep every layer's states.
    """
    captured: dict = {}
    blocks = model.get_decoder().layers

    def hook(index):
        def store(_module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]
        return store

    handles = [blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in dict.fromkeys(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class PendingTopk:
    """One batch's top-k and features on their way to host memory; `result()` waits and splits them."""

    def __init__(self, samples, counts, lengths, host: dict, event):
        self.samples, self.counts, self.lengths, self.host, self.event = samples, counts, lengths, host, event

    def result(self) -> list[tuple[np.ndarray, np.ndarray, dict]]:
        """Per sample (topk_ids int32 [P,k], topk_logprobs float32 [P,k], {feature: float32 [T, dim]})."""
        if self.event is not None:
            self.event.synchronize()  # the batch's only wait for the device
        finite = self.host.pop("finite").numpy()
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            sample_index = int(np.searchsorted(np.cumsum(self.counts), bad, side="right"))
            sample = self.samples[sample_index]
            t = int(np.flatnonzero(sample.loss_mask[1:])[bad - sum(self.counts[:sample_index])])
            raise NonFiniteLogitsError(f"the target produced NaN or inf logits for sample {sample.sample_id!r} "
                                       f"at position {t} (dtype problem or broken weights)")
        ids, logprobs = self.host.pop("ids").numpy(), self.host.pop("logprobs").numpy()
        features = {name: tensor.float().numpy() for name, tensor in self.host.items()}  # bf16 -> fp32 is exact
        rows, tokens = np.cumsum([0, *self.counts]), np.cumsum([0, *self.lengths])
        return [(ids[rows[b]:rows[b + 1]], logprobs[rows[b]:rows[b + 1]],
                 {name: values[tokens[b]:tokens[b + 1]] for name, values in features.items()})
                for b in range(len(self.samples))]


def launch_topk(model, samples: Sequence[Sample], k: int, features: Sequence[str] = (),
                aux: Sequence[int] = ()) -> PendingTopk:
    """Queue one padded teacher-forced forward of a batch and the copies of its results to the host.

    Row j of sample b is the target's distribution at position t_j - 1 (it predicts token t_j), for
    the trained positions t_j >= 1. lm_head runs only at those positions and top-k in fp32 whatever
    the model's dtype. Nothing here waits for a GPU: inputs and indices go up from pinned memory,
    results come down into pinned memory asynchronously, and a CUDA event marks the end.
    """
    import torch

    device = model.device
    cuda = device.type == "cuda"
    lengths = [len(s.input_ids) for s in samples]
    input_ids, attention = pad_batch(samples)
    width = input_ids.shape[1]
    trained = [np.flatnonzero(s.loss_mask[1:]) for s in samples]  # = t_j - 1
    counts = [len(t) for t in trained]
    positions = torch.from_numpy(np.concatenate([b * width + t for b, t in enumerate(trained)]).astype(np.int64))
    tokens = torch.from_numpy(np.concatenate([b * width + np.arange(n) for b, n in enumerate(lengths)]))

    def up(tensor, where=device):
        return (tensor.pin_memory() if cuda else tensor).to(where, non_blocking=True)

    def down(tensor):
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        return host.copy_(tensor, non_blocking=True)

    with torch.inference_mode():
        with layer_inputs(model, aux if "aux" in features else ()) as captured:
            hidden = model.get_decoder()(input_ids=up(input_ids), attention_mask=up(attention),
                                         use_cache=False).last_hidden_state  # [B, T, d]
        flat = hidden.reshape(-1, hidden.shape[-1])
        selected = flat.index_select(0, up(positions, flat.device))  # [P, d]
        head = model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        parts = []
        for start in range(0, selected.shape[0], LOGITS_CHUNK):
            logits = head(selected[start:start + LOGITS_CHUNK]).float()  # [chunk, V]
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            parts.append(topk_logprobs(logits, k))
        host = {"logprobs": down(torch.cat([p[0] for p in parts])),
                "ids": down(torch.cat([p[1] for p in parts]).to(torch.int32)),
                "finite": down(torch.cat([p[2] for p in parts]))}
        layers = {"last": [hidden]} if "last" in features else {}
        if "aux" in features:
            layers["aux"] = [captured[i].to(flat.device) for i in aux]
        for name, tensors in layers.items():  # every token of every sequence, in the model's dtype
            stacked = torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors], dim=-1)
            host[name] = down(stacked.index_select(0, up(tokens, stacked.device)))
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
    return PendingTopk(list(samples), counts, lengths, host, event)


def bare_forward(model, samples: Sequence[Sample]) -> list:
    """The honest limit of a target pass: the backbone, then the LM head at the trained positions only.

    What a build cannot avoid computing (no top-k, no copies to the host): benchmarks divide by it.
    """
    import torch

    device = model.device
    input_ids, attention = (t.to(device) for t in pad_batch(samples))
    width = input_ids.shape[1]
    positions = torch.from_numpy(np.concatenate([b * width + np.flatnonzero(s.loss_mask[1:])
                                                 for b, s in enumerate(samples)]).astype(np.int64))
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        selected = flat.index_select(0, positions.to(flat.device))
        head = model.get_output_embeddings()
        return [head(selected[start:start + LOGITS_CHUNK]) for start in range(0, selected.shape[0], LOGITS_CHUNK)]


def target_topk(model, samples: Sequence[Sample], k: int, features: Sequence[str] = (),
                aux: Sequence[int] = ()) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """One batch's per-sample (topk_ids [P,k], topk_logprobs [P,k], features) as CPU arrays (launch_topk, then wait)."""
    return launch_topk(model, samples, k, features, aux).result()


def sample_seed(seed: int, sample_id: str, turn: int) -> int:
    """A 63-bit seed for one regenerated reply: the same wherever and whenever it runs."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}\0{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_reply(model, prompt_ids: list[int], *, max_new_tokens: int, stop_ids: set[int], generator) -> list[int]:
    """Sample a reply at temperature 1 (fp32 softmax) with a KV cache; stops at a stop token (not included)."""
    import torch

    reply: list[int] = []
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    step_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            outputs = model(input_ids=step_ids, use_cache=True, **{cache_name: past})
            past = outputs[cache_name]  # transformers >= 5.2x renamed past_key_values to cache
            # sampled on the CPU with a CPU generator: the same reply on any device for the same probs
            probs = torch.softmax(outputs.logits[0, -1].float(), dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
            if token in stop_ids:
                break
            reply.append(token)
            step_ids = torch.tensor([[token]], dtype=torch.long, device=model.device)
    return reply


def regenerate(model, tokenizer, messages: Sequence[dict], *, sample_id: str, seed: int,
               max_new_tokens: int, max_length: int) -> list[dict]:
    """The conversation with each assistant reply (after a user turn) resampled from the target at T=1.

    Later turns see the regenerated earlier replies; a turn whose prompt no longer fits in
    max_length ends the conversation there.
    """
    import torch

    stop_ids = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop_ids |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    stop_ids.discard(None)
    result: list[dict] = []
    seen_user = False
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or not seen_user:
            seen_user |= message["role"] == "user"
            result.append(dict(message))
            continue
        prompt_ids = tokenizer.apply_chat_template(result, add_generation_prompt=True, tokenize=True)
        if hasattr(prompt_ids, "keys"):  # BatchEncoding in newer transformers
            prompt_ids = prompt_ids["input_ids"]
        budget = min(max_new_tokens, max_length - len(prompt_ids))
        if budget <= 0:
            break
        generator = torch.Generator().manual_seed(sample_seed(seed, sample_id, turn))
        reply = sample_reply(model, list(prompt_ids), max_new_tokens=budget, stop_ids=stop_ids,
                             generator=generator)
        result.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})
    while result and result[-1]["role"] != "assistant":
        result.pop()
    return result


def load_placed_model(path, *, dtype: str, max_memory: dict, offload_folder: str | None = None):
    """A causal LM split over the devices of `max_memory` (accelerate device map, whole layers, in order).

    Raises BuildError when a module would land anywhere else (the devices are too small).
    """
    from transformers import AutoModelForCausalLM

    from trainer.precision import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), device_map="auto",
                                                 max_memory=max_memory, offload_folder=offload_folder,
                                                 trust_remote_code=False)
    allowed = set(max_memory) | ({"disk"} if offload_folder else set())
    outside = {str(device) for device in model.hf_device_map.values()} - {str(device) for device in allowed}
    if outside:
        raise BuildError(f"the target does not fit in {sorted(map(str, max_memory))} with "
                         f"{max(max_memory.values()) / 2**30:.1f} GiB each: modules went to {sorted(outside)}; "
                         "give more --gpus-per-worker (or auto)")
    return model.eval()


def load_target(spec: WorkerSpec):
    """The worker's model: on one device, or split over `spec.gpus` GPUs."""
    from pipeline.resolve.models import load_model

    if spec.device == "cuda" and spec.gpus > 1:
        return load_placed_model(spec.model_path, dtype=spec.dtype,
                                 max_memory={gpu: spec.max_memory_bytes for gpu in range(spec.gpus)})
    return load_model(spec.model_path, dtype=spec.dtype, device=spec.device)


class TargetWorker:
    """Ray actor (threaded, SHARDS_IN_FLIGHT at once): holds the target model and commits the shards it is given."""

    def __init__(self, spec: WorkerSpec):
        import torch

        from cache import CacheWriter

        torch.set_num_threads(spec.threads)  # same thread count everywhere: same bits everywhere
        self.spec = spec
        self.model = load_target(spec)
        self.model_lock = threading.Lock()  # one shard on the model at a time
        self.tokenizer = None
        if spec.regenerate:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        self.writer = CacheWriter(spec.cache_dir, k=spec.k, vocab_size=spec.vocab_size,
                                  features=spec.features, feature_dims=spec.feature_dims)

    def pid(self) -> int:
        """The worker's process id (tests kill it to check fault tolerance)."""
        return os.getpid()

    def run_shard(self, task: ShardTask) -> dict:
        """Compute and commit one shard; returns {"info": ShardInfo, "tokens", "seconds", "skipped", ...}.

        The model is held only to compute; encoding and the atomic commit run after it is released,
        alongside the next shard's forward.
        """
        with self.model_lock:
            started = time.perf_counter()
            samples, skipped = list(task.samples), {}
            if self.spec.regenerate:
                samples, skipped = self._regenerate(samples)
            records = self.compute_records(samples)
            computed = time.perf_counter()
        try:
            info = self.writer.write_shard(task.index, records)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise BuildError(
                    f"no space left on the device while writing shard {task.index} into "
                    f"{self.spec.cache_dir}: free space and rerun the same command (committed shards are "
                    "kept; no partial file is ever accepted)"
                ) from None
            raise
        done = time.perf_counter()
        return {"info": info, "tokens": int(sum(len(s.input_ids) for s in samples)), "seconds": done - started,
                "compute_seconds": computed - started, "write_seconds": done - computed, "skipped": skipped}

    def compute_records(self, samples: list[Sample]) -> list:
        """SequenceRecords of `samples`: batch i+1 is queued before batch i's results are read back."""
        from cache import SequenceRecord

        records: list = [None] * len(samples)
        pending = None
        for batch in [*plan_batches([len(s.input_ids) for s in samples], self.spec.token_budget), None]:
            launched = None if batch is None else (batch, launch_topk(
                self.model, [samples[i] for i in batch], self.spec.k, self.spec.features, self.spec.aux_layers))
            if pending is not None:
                indices, result = pending
                for i, (ids, logprobs, feats) in zip(indices, result.result()):
                    sample = samples[i]
                    records[i] = SequenceRecord(sample.sample_id, sample.input_ids, sample.loss_mask, ids, logprobs,
                                                feats)
            pending = launched
        return records

    def _regenerate(self, samples: list[Sample]) -> tuple[list[Sample], dict]:
        from pipeline.resolve.chat import tokenize_conversation

        result, skipped = [], {}
        for sample in samples:
            messages = regenerate(self.model, self.tokenizer, sample.messages, sample_id=sample.sample_id,
                                  seed=self.spec.seed, max_new_tokens=self.spec.max_new_tokens,
                                  max_length=self.spec.max_length)
            tokens = tokenize_conversation(self.tokenizer, messages, self.spec.max_length) if messages else None
            if tokens is None or tokens.num_positions == 0:
                reason = "no assistant tokens within max length"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            result.append(Sample(sample.sample_id, tokens.input_ids, tokens.loss_mask))
        return result, skipped
