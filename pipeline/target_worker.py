"""The target pass of one shard: teacher-forced forward, top-k log-probs, features, shard commit.

`TargetWorker` is the Ray actor; the functions it calls are plain and also serve benchmarks and tests.
"""
from __future__ import annotations

import errno
import hashlib
import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LOGITS_CHUNK = 1024  # positions per lm_head + log_softmax chunk: bounds memory at chunk * vocab * 4 bytes


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
    device: str = "cpu"  # "cpu" or "cuda" (resolved by the driver; a cuda actor holds one GPU)


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


def target_topk(model, samples: Sequence[Sample], k: int, features: Sequence[str] = (),
                aux: Sequence[int] = ()) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """One padded teacher-forced forward of a batch: per sample (topk_ids [P,k], topk_logprobs [P,k], features).

    Row j of sample b is the target's distribution at position t_j - 1 (it predicts token t_j), for
    the trained positions t_j >= 1. lm_head runs only at those positions; log_softmax and top-k run
    in fp32 whatever the model's dtype. Inputs go to `model.device`; results come back as CPU arrays.
    """
    import torch

    device = model.device
    input_ids, attention = (t.to(device) for t in pad_batch(samples))
    lengths = [len(s.input_ids) for s in samples]
    with torch.inference_mode():
        outputs = model.get_decoder()(input_ids=input_ids, attention_mask=attention,
                                      output_hidden_states=bool(features), use_cache=False)
        hidden = outputs.last_hidden_state  # [B, T, d]
        rows, cols = [], []
        for b, sample in enumerate(samples):
            targets = np.flatnonzero(sample.loss_mask[1:])  # = t_j - 1
            rows.append(np.full(len(targets), b))
            cols.append(targets)
        rows_t = torch.from_numpy(np.concatenate(rows)).long().to(device)
        cols_t = torch.from_numpy(np.concatenate(cols)).long().to(device)
        selected = hidden[rows_t, cols_t]  # [P_total, d]
        head = model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        top_ids, top_logprobs = [], []
        for start in range(0, selected.shape[0], LOGITS_CHUNK):
            logits = head(selected[start:start + LOGITS_CHUNK]).float()  # [chunk, V]
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            finite = torch.isfinite(logits).all(dim=-1)
            if not bool(finite.all()):
                bad = start + int((~finite).nonzero()[0, 0])
                b, t = int(rows_t[bad]), int(cols_t[bad])
                raise NonFiniteLogitsError(
                    f"the target produced NaN or inf logits for sample {samples[b].sample_id!r} at "
                    f"position {t} (dtype problem or broken weights)"
                )
            values, ids = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
            top_ids.append(ids.to(torch.int32))
            top_logprobs.append(values)
        all_ids = torch.cat(top_ids).cpu().numpy() if top_ids else np.zeros((0, k), np.int32)
        all_logprobs = torch.cat(top_logprobs).cpu().numpy() if top_logprobs else np.zeros((0, k), np.float32)
        layers = {}
        if "last" in features:
            layers["last"] = [hidden]
        if "aux" in features:
            layers["aux"] = [outputs.hidden_states[i] for i in aux]
        results, offset = [], 0
        for b, sample in enumerate(samples):
            count = len(cols[b])
            feats = {
                name: torch.cat([h[b, : lengths[b]] for h in tensors], dim=-1).float().cpu().numpy()
                for name, tensors in layers.items()
            }
            results.append((all_ids[offset:offset + count], all_logprobs[offset:offset + count], feats))
            offset += count
    return results


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


class TargetWorker:
    """Ray actor: holds the target model and commits the shards it is given."""

    def __init__(self, spec: WorkerSpec):
        import torch

        from cache import CacheWriter
        from pipeline.models import load_model

        torch.set_num_threads(spec.threads)  # same thread count everywhere: same bits everywhere
        self.spec = spec
        self.model = load_model(spec.model_path, dtype=spec.dtype, device=spec.device)
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
        """Compute and commit one shard; returns {"info": ShardInfo, "tokens", "seconds", "skipped"}."""
        from cache import SequenceRecord

        started = time.perf_counter()
        samples, skipped = list(task.samples), {}
        if self.spec.regenerate:
            samples, skipped = self._regenerate(samples)
        records: list[SequenceRecord | None] = [None] * len(samples)
        for batch in plan_batches([len(s.input_ids) for s in samples], self.spec.token_budget):
            outputs = target_topk(self.model, [samples[i] for i in batch], self.spec.k,
                                  self.spec.features, self.spec.aux_layers)
            for i, (ids, logprobs, feats) in zip(batch, outputs):
                sample = samples[i]
                records[i] = SequenceRecord(sample.sample_id, sample.input_ids, sample.loss_mask, ids, logprobs,
                                            feats)
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
        return {"info": info, "tokens": int(sum(len(s.input_ids) for s in samples)),
                "seconds": time.perf_counter() - started, "skipped": skipped}

    def _regenerate(self, samples: list[Sample]) -> tuple[list[Sample], dict]:
        from pipeline.chat import tokenize_conversation

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
