"""The worker's maths and placement: top-k minus log-sum-exp, captured layers, a split model, the honest bare forward."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.resolve.models import load_model
from pipeline.target_pass import (NonFiniteLogitsError, Sample, bare_forward, launch_topk, layer_inputs,
                                  load_placed_model, target_topk, topk_logprobs)

VOCAB, K = 211, 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama (fp32) saved as a HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("worker-model")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def batch(count: int = 3) -> list[Sample]:
    rng = np.random.default_rng(1)
    return [Sample(f"s{i}", rng.integers(0, VOCAB, 10 + 6 * i, dtype=np.int32), np.arange(10 + 6 * i) >= 3)
            for i in range(count)]


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_topk_minus_logsumexp_is_the_log_softmax_topk(scale):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5000, generator=generator) * scale
    old_values, old_ids = torch.topk(torch.log_softmax(logits, dim=-1), K, dim=-1)  # the previous formula
    values, ids, finite = topk_logprobs(logits.clone(), K)
    assert torch.equal(ids, old_ids) and bool(finite.all())
    torch.testing.assert_close(values, old_values, rtol=0, atol=2e-6)


def test_topk_of_bf16_logits_picks_entries_of_equal_log_prob_on_ties():
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(32, 3000, generator=generator) * 4).bfloat16().float()  # bf16 values: many ties
    reference = torch.log_softmax(logits, dim=-1)
    old_values, _ = torch.topk(reference, K, dim=-1)
    values, ids, _ = topk_logprobs(logits.clone(), K)
    torch.testing.assert_close(values, old_values, rtol=0, atol=2e-6)
    torch.testing.assert_close(reference.gather(1, ids), values, rtol=0, atol=2e-6)  # tied ids carry equal values


def test_rows_with_nan_or_inf_logits_are_not_finite():
    logits = torch.zeros(4, 50)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :] = float("-inf")
    _, _, finite = topk_logprobs(logits, K)
    assert finite.tolist() == [True, False, False, False]


def test_layer_inputs_are_the_hidden_states_output_hidden_states_returns(model_dir):
    model = load_model(model_dir, dtype="fp32")
    input_ids = torch.from_numpy(batch(1)[0].input_ids.astype(np.int64))[None]
    with torch.inference_mode():
        reference = model.get_decoder()(input_ids=input_ids, output_hidden_states=True).hidden_states
        with layer_inputs(model, (1, 2, 3)) as captured:
            model.get_decoder()(input_ids=input_ids)
    for i in (1, 2, 3):
        assert torch.equal(captured[i], reference[i])
    assert not any(layer._forward_pre_hooks for layer in model.get_decoder().layers)  # hooks removed


def reference_outputs(model, sample: Sample, aux) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unpadded full forward: fp32 log_softmax top-k at trained positions, last and aux hidden states."""
    input_ids = torch.from_numpy(sample.input_ids.astype(np.int64))[None]
    with torch.inference_mode():
        out = model(input_ids=input_ids, output_hidden_states=True)
        last = model.get_decoder()(input_ids=input_ids).last_hidden_state[0]
    rows = torch.from_numpy(np.flatnonzero(sample.loss_mask[1:]))
    values, ids = torch.log_softmax(out.logits[0, rows].float(), dim=-1).topk(K, dim=-1)
    aux_states = torch.cat([out.hidden_states[i][0] for i in aux], dim=-1)
    return ids.numpy(), values.numpy(), last.float().numpy(), aux_states.float().numpy()


def test_target_topk_with_features_matches_an_unpadded_forward(model_dir):
    model = load_model(model_dir, dtype="fp32")
    aux = (1, 2, 3)
    samples = batch()
    for sample, (ids, logprobs, features) in zip(samples, target_topk(model, samples, K, ("last", "aux"), aux)):
        ref_ids, ref_values, ref_last, ref_aux = reference_outputs(model, sample, aux)
        assert ids.dtype == np.int32 and np.array_equal(ids, ref_ids)
        np.testing.assert_allclose(logprobs, ref_values, rtol=0, atol=1e-5)
        np.testing.assert_allclose(features["last"], ref_last, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(features["aux"], ref_aux, rtol=1e-5, atol=1e-5)
        assert features["aux"].shape == (len(sample.input_ids), 3 * 48)


def test_nan_logits_name_the_sample_and_position(model_dir):
    model = load_model(model_dir, dtype="fp32")
    with torch.no_grad():
        model.get_output_embeddings().weight[5].fill_(float("nan"))
    samples = batch()
    pending = launch_topk(model, samples, K)  # nothing raised before the results are read
    with pytest.raises(NonFiniteLogitsError, match="NaN or inf logits for sample 's0' at position 2"):
        pending.result()


def test_a_model_split_over_devices_gives_the_same_topk(model_dir, tmp_path):
    """Half the layers on the CPU, half offloaded to disk (accelerate hooks, as over GPUs): same top-k."""
    whole = load_model(model_dir, dtype="fp32")
    layer_bytes = sum(p.numel() * 4 for p in whole.get_decoder().layers[0].parameters())
    embed_bytes = whole.get_input_embeddings().weight.numel() * 4
    split = load_placed_model(model_dir, dtype="fp32", max_memory={"cpu": embed_bytes + 2 * layer_bytes + 4096},
                              offload_folder=str(tmp_path / "offload"))
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    samples = batch()
    aux = (1, 3)
    for (ids, lps, feats), (ref_ids, ref_lps, ref_feats) in zip(target_topk(split, samples, K, ("aux",), aux),
                                                              target_topk(whole, samples, K, ("aux",), aux)):
        assert np.array_equal(ids, ref_ids)
        np.testing.assert_allclose(lps, ref_lps, rtol=0, atol=1e-6)
        np.testing.assert_allclose(feats["aux"], ref_feats["aux"], rtol=0, atol=1e-6)


def test_a_model_too_big_for_its_devices_is_refused(model_dir):
    from pipeline.target_pass import BuildError

    with pytest.raises(BuildError, match="does not fit"):
        load_placed_model(model_dir, dtype="fp32", max_memory={"cpu": 10_000})


def test_bare_forward_is_the_lm_head_at_trained_positions_only(model_dir):
    model = load_model(model_dir, dtype="fp32")
    samples = batch()
    logits = torch.cat(bare_forward(model, samples))
    assert logits.shape == (sum(int(s.loss_mask[1:].sum()) for s in samples), VOCAB)
    ids = torch.topk(torch.log_softmax(logits, -1), K, -1).indices
    expected = np.concatenate([reference_outputs(model, s, (1,))[0] for s in samples])
    assert np.array_equal(ids.numpy(), expected)


def test_gpus_per_worker_is_auto_or_a_positive_integer(tmp_path):
    from pipeline.build import BuildConfig, ConfigError
    from pipeline.cli import build_parser

    for value in (0, -1, "two", 1.5):
        with pytest.raises(ConfigError, match="gpus_per_worker must be auto or an integer >= 1"):
            BuildConfig(target="m", data="d", out=tmp_path, gpus_per_worker=value).validate()
    BuildConfig(target="m", data="d", out=tmp_path, gpus_per_worker=2).validate()
    parser = build_parser()
    base = ["cache", "build", "--target", "m", "--data", "d", "--out", str(tmp_path)]
    assert parser.parse_args(base).gpus_per_worker == "auto"
    assert parser.parse_args(base + ["--gpus-per-worker", "4"]).gpus_per_worker == 4
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--gpus-per-worker", "0"])


@pytest.mark.slow
def test_several_gpus_per_worker_on_cpu_workers_is_refused(ray_address, tiny_llama_dir, tmp_path):
    import json

    from pipeline.build import BuildConfig, run_build
    from pipeline.target_pass import BuildError

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n")
    config = BuildConfig(target=str(tiny_llama_dir), data=str(data), out=tmp_path / "out", k=4, workers=1,
                         device="cpu", gpus_per_worker=2, progress=False)
    config.validate()
    with pytest.raises(BuildError, match="--gpus-per-worker 2 needs GPU workers"):
        run_build(config)


def test_bench_gpus_per_worker_is_checked(tmp_path):
    from pipeline.bench_job import BenchConfig
    from pipeline.cli import build_parser
    from trainer.settings import ConfigError as BenchConfigError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    for value in (-1, "two"):
        with pytest.raises(BenchConfigError, match="gpus_per_worker must be auto or an integer >= 0"):
            BenchConfig(target="t", drafters=["d"], benchmarks=[str(prompts)], gpus_per_worker=value).validate()
    parser = build_parser()
    base = ["bench", "--target", "t", "--drafter", "d"]
    assert parser.parse_args(base).gpus_per_worker == "auto"
    assert parser.parse_args(base + ["--gpus-per-worker", "0"]).gpus_per_worker == 0
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--gpus-per-worker", "-2"])


@pytest.mark.slow
def test_bench_asks_for_gpus_only_where_there_are_some(ray_address, tiny_llama_dir, tmp_path):
    from pipeline.bench_job import BenchConfig, _target_gpus
    from trainer.settings import ConfigError as BenchConfigError

    items = [{"input_ids": [1, 2, 3]}]
    auto = BenchConfig(target=str(tiny_llama_dir), drafters=["d"], workers=2)
    assert _target_gpus(auto, tiny_llama_dir, items) == (0, 0, 2)  # a CPU cluster: decode on the CPU
    with pytest.raises(BenchConfigError, match="gpus_per_worker=2: the Ray cluster has no GPU"):
        _target_gpus(BenchConfig(target=str(tiny_llama_dir), drafters=["d"], gpus_per_worker=2), tiny_llama_dir,
                     items)


def _host_reads(fn) -> int:
    """Ops that read a tensor's value on the host (a device synchronization on a GPU), from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::_local_scalar_dense", "aten::nonzero"))


def test_the_build_batch_reads_nothing_back_beyond_what_the_model_itself_does(model_dir, monkeypatch):
    import pipeline.target_pass as worker

    monkeypatch.setattr(worker, "LOGITS_CHUNK", 8)  # many LM-head chunks: none may add a read
    model = load_model(model_dir, dtype="fp32")
    samples = batch()
    assert _host_reads(lambda: launch_topk(model, samples, K, ("aux",), (1, 2))) == \
        _host_reads(lambda: bare_forward(model, samples))
