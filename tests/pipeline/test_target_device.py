"""Device placement of the target pass: --device validation, the worker's device choice, CPU worker path (no Ray)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache import content_key, create_manifest, open_cache
from pipeline.build import BuildConfig, ConfigError, worker_device
from pipeline.cli import main
from pipeline.target_pass import BuildError, Sample, target_topk
from pipeline.target_worker import ShardTask, TargetWorker, WorkerSpec

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
VOCAB, K = 97, 5


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama saved as a HF directory (fp32; no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny-target")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def samples(count: int = 3) -> list[Sample]:
    rng = np.random.default_rng(0)
    result = []
    for i in range(count):
        length = 12 + 5 * i
        mask = np.arange(length) >= 4
        result.append(Sample(f"s{i}", rng.integers(0, VOCAB, length, dtype=np.int32), mask))
    return result


def reference_topk(model, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: one unpadded full forward, fp32 log_softmax, top-k at positions t-1 of trained t."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(sample.input_ids.astype(np.int64))[None]).logits[0].float()
    rows = torch.from_numpy(np.flatnonzero(sample.loss_mask[1:]))
    values, ids = torch.log_softmax(logits[rows], dim=-1).topk(K, dim=-1)
    return ids.numpy(), values.numpy()


@no_gpu
def test_cli_refuses_device_cuda_without_a_gpu_before_starting_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    was_running = ray.is_initialized()
    argv = ["cache", "build", "--target", "any-model", "--data", "any.jsonl", "--out", str(tmp_path / "out"),
            "--device", "cuda"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "--device cuda needs a GPU" in error and "--device cpu" in error
    assert ray.is_initialized() == was_running and not (tmp_path / "out").exists()


def test_device_values_are_validated_and_a_remote_cluster_defers_the_gpu_check(tmp_path):
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        BuildConfig(target="m", data="d", out=tmp_path, device="gpu").validate()
    config = BuildConfig(target="m", data="d", out=tmp_path, device="cuda", address="10.0.0.1:6379")
    config.validate()  # the cluster's GPUs are counted when the workers start, not on this machine
    assert config.device == "cuda"


def test_worker_device_follows_the_clusters_gpus():
    assert worker_device("auto", 0) == "cpu" and worker_device("auto", 2) == "cuda"
    assert worker_device("cpu", 4) == "cpu" and worker_device("cuda", 1) == "cuda"
    with pytest.raises(BuildError, match="--device cuda: the Ray cluster has 0 GPUs"):
        worker_device("cuda", 0)


def test_cpu_worker_commits_the_same_topk_as_an_independent_forward(tiny_model_dir, tmp_path):
    spec = WorkerSpec(model_path=str(tiny_model_dir), dtype="fp32", cache_dir=str(tmp_path / "cache"), k=K,
                      vocab_size=VOCAB, token_budget=40, device="cpu")
    identity = {"test": "device"}
    manifest = create_manifest(tmp_path / "cache", key=content_key(identity), identity=identity, k=K,
                               vocab_size=VOCAB, tokenizer_sha256="0" * 64, features={}, num_shards_planned=1)
    worker = TargetWorker(spec)
    assert worker.model.device.type == "cpu" and worker.model.dtype == torch.float32
    batch = samples()
    manifest.record_shard(worker.run_shard(ShardTask(0, tuple(batch)))["info"])
    manifest.finalize()

    stored = {record.sample_id: record for record in open_cache(tmp_path / "cache").iter_sequences()}
    for sample in batch:
        ids, logprobs = reference_topk(worker.model, sample)
        record = stored[sample.sample_id]
        assert np.array_equal(record.topk_ids, ids)
        np.testing.assert_allclose(record.topk_logprobs, logprobs, rtol=2e-3, atol=2e-3)  # stored as fp16


def test_target_topk_returns_cpu_arrays_with_features(tiny_model_dir):
    from pipeline.resolve.models import load_model

    model = load_model(tiny_model_dir, dtype="fp32", device="cpu")
    batch = samples(2)
    outputs = target_topk(model, batch, K, ("last",))
    for sample, (ids, logprobs, features) in zip(batch, outputs):
        ref_ids, ref_logprobs = reference_topk(model, sample)
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and np.array_equal(ids, ref_ids)
        np.testing.assert_allclose(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
        assert features["last"].shape == (len(sample.input_ids), 32) and features["last"].dtype == np.float32
