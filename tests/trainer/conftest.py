"""A tiny real cache for the trainer tests: exact top-k of a real forward of a tiny Llama target.

`tiny_llama_dir` (random weights, SmolLM2's tokenizer) predicts an almost uniform distribution, so
the target here is the same model with its (tied) embeddings scaled up: peaked, context-dependent
distributions a drafter can learn in a few dozen steps. Also imported by tests/pipeline/.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_K = 16
EMBEDDING_SCALE = 30.0


def make_tiny_target(tiny_llama_dir: Path, out: Path) -> Path:
    """Save a sharpened copy of the tiny random Llama (embeddings × EMBEDDING_SCALE) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(EMBEDDING_SCALE)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def random_sequences(num: int, *, seed: int = 0, token_range=(1000, 1400), lengths=(12, 40)):
    """(sample_id, input_ids int32 [T], loss_mask bool [T]): a short unmasked prompt, then a trained response."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        ids = rng.integers(token_range[0], token_range[1], size=length).astype(np.int32)
        mask = np.zeros(length, dtype=bool)
        mask[int(rng.integers(3, 8)):] = True
        out.append((f"seq-{seed}-{i:05d}", ids, mask))
    return out


def build_cache(out: Path, target_dir: Path, sequences, *, num_shards: int = 4, k: int = TINY_K,
                tokenizer_sha256: str | None = None, vocab_size: int | None = None,
                record_target_path: bool = True, last: bool = False) -> Path:
    """Write a complete cache from a real forward of target_dir over `sequences` (exact top-k of log_softmax).

    last: also store the `last` feature column (the final hidden state), as `cache build --features last`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cache import CacheWriter, SequenceRecord, content_key, create_manifest
    from pipeline.resolve.models import resolve_model, tokenizer_fingerprint

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    resolved = resolve_model(str(target_dir))
    vocab_size = vocab_size or model.config.vocab_size
    tokenizer_sha256 = tokenizer_sha256 or tokenizer_fingerprint(AutoTokenizer.from_pretrained(target_dir))
    records = []
    with torch.no_grad():
        for sample_id, ids, mask in sequences:
            output = model(torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=last)
            logprobs = output.logits[0].log_softmax(-1)  # [T, V]
            positions = np.flatnonzero(mask[1:]) + 1
            top = logprobs[torch.from_numpy(positions - 1)].topk(k, dim=-1)  # sorted, descending
            records.append(SequenceRecord(sample_id=sample_id, input_ids=ids, loss_mask=mask,
                                          topk_ids=top.indices.numpy().astype(np.int32),
                                          topk_logprobs=top.values.numpy().astype(np.float32),
                                          features={"last": output.hidden_states[-1][0].numpy()} if last else {}))
    features = {"last": {"dim": model.config.hidden_size}} if last else {}
    identity = {"target": resolved.identity, "k": k, "test_sequences": [s for s, _, _ in sequences][:3],
                "n": len(sequences), **({"features": sorted(features)} if features else {})}
    if record_target_path:
        identity.update(target_path=str(resolved.path), target_spec=str(target_dir))
    key = content_key(identity)
    cache_dir = out / key
    manifest = create_manifest(cache_dir, key=key, identity=identity, k=k, vocab_size=vocab_size,
                               tokenizer_sha256=tokenizer_sha256, features=features, num_shards_planned=num_shards)
    writer = CacheWriter(cache_dir, k=k, vocab_size=vocab_size, features=tuple(features),
                         feature_dims={name: spec["dim"] for name, spec in features.items()})
    for shard in range(num_shards):
        manifest.record_shard(writer.write_shard(shard, records[shard::num_shards]))
    manifest.finalize()
    return cache_dir


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The sharpened tiny Llama target (a HF directory with SmolLM2's tokenizer)."""
    return make_tiny_target(tiny_llama_dir, tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_target_dir) -> Path:
    """48 sequences of 12-40 tokens in 4 shards, k=16, from a real forward of the tiny target."""
    return build_cache(tmp_path_factory.mktemp("caches"), tiny_target_dir, random_sequences(48))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add synchronisation latency (large on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
