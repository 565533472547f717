"""The target's side of a build, in plain torch (no Ray): padded teacher-forced batches, top-k log-probs
of the trained positions, hidden-state features, and regenerated replies.

`launch_topk` queues one batch's forward before anyone reads its results back (`PendingTopk.result`),
so a caller can overlap the next batch with the previous one; on a GPU nothing waits for the device
except that read. The Ray actor (pipeline.target_worker) and the benchmarks call these functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

LOGITS_CHUNK = 1024  # positions per lm_head + top-k chunk: bounds memory at chunk * vocab * 4 bytes


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
