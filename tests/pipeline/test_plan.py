"""`lkspec plan`: model shapes from config.json alone, GPU placement, cache-size and FLOP maths, the CLI."""
from __future__ import annotations

import json

import pytest

from pipeline.plan import (GIB, MEASURED_VOCAB, TOPK_ENTRY_BYTES, CacheSize, PlanError, TokenCounts, cache_size,
                           config_path, count_tokens, entry_bytes, evenly_spaced, forward_flops, id_scale,
                           load_model_shape, plan_placement, read_model_shape)


def _counts(tokens=1000.0, positions=600.0, sequences=10, sum_sq=100_000.0) -> TokenCounts:
    return TokenCounts(sequences=sequences, tokens=tokens, positions=positions, sum_squared_lengths=sum_sq,
                       sampled=sequences, population=sequences)


@pytest.mark.parametrize("name, total, active", [
    ("smollm2-135m", 134.5e6, 134.5e6),
    ("llama-3.1-8b", 8.03e9, None),
    ("llama-3.1-70b", 70.55e9, None),
    ("qwen3-235b-a22b", 235.1e9, 22.2e9),  # Qwen's "A22B" counts the embeddings
    ("deepseek-v3", 671.0e9, 36.6e9),  # DeepSeek's published counts (without the MTP module)
    ("gpt-oss-120b", 116.8e9, 5.1e9),
])
def test_parameter_counts_of_the_shipped_configs_match_the_published_ones(name, total, active):
    shape = load_model_shape(name)
    assert shape.total_params() == pytest.approx(total, rel=0.005)
    if active is not None:
        with_embeddings = shape.active_params() + (shape.embedding_params() if name.startswith("qwen3") else 0)
        assert with_embeddings == pytest.approx(active, rel=0.02)


def test_moe_layers_follow_the_config():
    assert load_model_shape("qwen3-235b-a22b").moe_layers == 94
    assert load_model_shape("deepseek-v3").moe_layers == 58  # first_k_dense_replace = 3
    assert load_model_shape("llama-3.1-8b").moe_layers == 0


def test_a_config_file_or_directory_is_enough(tmp_path):
    config = json.loads(config_path("llama-3.1-8b").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    by_dir = load_model_shape(str(tmp_path))
    by_file = load_model_shape(str(tmp_path / "config.json"))
    assert by_dir.total_params() == by_file.total_params() == load_model_shape("llama-3.1-8b").total_params()


def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(PlanError, match="hidden_size"):
        read_model_shape({"num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10})
    with pytest.raises(PlanError, match="num_experts_per_tok"):
        read_model_shape({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
                          "num_experts": 4})
    with pytest.raises(PlanError, match="unknown target"):
        load_model_shape(str(tmp_path / "missing"))


@pytest.mark.parametrize("name, gpu_gib, dtype, expected", [
    ("llama-3.1-8b", 80, "bf16", 1),
    ("llama-3.1-70b", 80, "bf16", 2),
    ("llama-3.1-70b", 80, "fp32", 4),
    ("llama-3.1-70b", 141, "bf16", 2),  # 131 GiB of weights leave too little of 141
    ("qwen3-235b-a22b", 141, "bf16", 4),
    ("qwen3-235b-a22b", 80, "bf16", 7),
    ("gpt-oss-120b", 80, "bf16", 4),
])
def test_placement_is_the_fewest_gpus_that_hold_weights_and_working_memory(name, gpu_gib, dtype, expected):
    shape = load_model_shape(name)
    placement = plan_placement(shape, gpu_memory_bytes=gpu_gib * GIB, gpus_per_node=8, dtype=dtype)
    assert placement.gpus_per_worker == expected
    assert placement.workers_per_node == 8 // expected
    if expected > 1:  # the fewest: a node of one GPU fewer cannot hold it
        with pytest.raises(PlanError, match="do not fit"):
            plan_placement(shape, gpu_memory_bytes=gpu_gib * GIB, gpus_per_node=expected - 1, dtype=dtype)


def test_placement_refuses_a_model_no_node_can_hold():
    with pytest.raises(PlanError, match="1249.9 GiB of bf16 weights .* do not fit in 8 GPUs of 141 GiB"):
        plan_placement(load_model_shape("deepseek-v3"), gpu_memory_bytes=141 * GIB, gpus_per_node=8)


def test_a_larger_batch_or_aux_features_can_need_more_gpus():
    shape = load_model_shape("llama-3.1-70b")
    small = plan_placement(shape, gpu_memory_bytes=int(144 * GIB), gpus_per_node=8, token_budget=1024)
    large = plan_placement(shape, gpu_memory_bytes=int(144 * GIB), gpus_per_node=8, token_budget=65536,
                           features=("aux",))
    assert small.gpus_per_worker == 1 and large.gpus_per_worker == 2
    assert large.feature_bytes == 65536 * 3 * 8192 * 2


def test_entry_bytes_interpolate_the_measured_table():
    assert entry_bytes(64) == pytest.approx(sum(TOPK_ENTRY_BYTES[64]))
    low, high = sorted((sum(TOPK_ENTRY_BYTES[64]), sum(TOPK_ENTRY_BYTES[32])))
    assert low <= entry_bytes(48) <= high
    assert entry_bytes(10**6) == pytest.approx(sum(TOPK_ENTRY_BYTES[max(TOPK_ENTRY_BYTES)]))
    assert id_scale(128256) > id_scale(MEASURED_VOCAB) == 1.0


def test_cache_size_adds_topk_per_trained_position_and_features_per_token():
    shape = load_model_shape("llama-3.1-8b")
    counts = _counts()
    none = cache_size(shape, counts, k=64)
    aux = cache_size(shape, counts, k=64, features=("aux",))
    assert isinstance(none, CacheSize) and none.features == {}
    assert none.topk == pytest.approx(600 * 64 * entry_bytes(64))
    raw_aux = 1000 * 3 * 4096 * 2  # three bf16 hidden states of 4096 at each of the 1000 tokens
    assert 0.5 * raw_aux < aux.features["aux"] <= raw_aux
    assert aux.total - aux.features["aux"] > none.total  # and one more file per shard
    assert cache_size(shape, _counts(positions=1200.0), k=64).topk == pytest.approx(2 * none.topk)


def test_forward_flops_by_hand_for_one_dense_sequence():
    shape = load_model_shape("llama-3.1-8b")
    length = 100
    counts = _counts(tokens=float(length), positions=40.0, sequences=1, sum_sq=float(length**2))
    body = 2 * shape.body_params(active=True) * length
    attention = 2 * 32 * 32 * (128 + 128) * length * (length + 1) / 2
    head = 2 * 4096 * 128256 * 40
    assert forward_flops(shape, counts) == pytest.approx(body + attention + head)


def test_evenly_spaced_covers_the_range_without_repeats():
    assert evenly_spaced(5, 10) == [0, 1, 2, 3, 4]
    picked = evenly_spaced(1000, 10)
    assert len(picked) == 10 and picked[0] < 100 and picked[-1] > 900 and picked == sorted(set(picked))


def _write_conversations(path, count: int):
    rows = []
    for i in range(count):
        reply = " ".join(["word"] * (5 + (i * 7) % 40))
        rows.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}?"},
                                                 {"role": "assistant", "content": reply}]})
    rows.append({"id": "bad", "messages": [{"role": "user", "content": "no reply"}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_sampled_token_count_estimates_the_exact_one(tmp_path, smollm2_path):
    from transformers import AutoTokenizer

    from pipeline.resolve.datasets import open_dataset
    from pipeline.plan import read_conversations

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    conversations, skipped = read_conversations(open_dataset(str(_write_conversations(tmp_path / "d.jsonl", 60))),
                                                None)
    assert len(conversations) == 60 and sum(skipped.values()) == 1
    exact = count_tokens(conversations, tokenizer, max_length=1024, sample=1000)
    sampled = count_tokens(conversations, tokenizer, max_length=1024, sample=20)
    assert exact.exact and not sampled.exact and exact.positions_stderr == 0
    assert exact.sequences == 60 and sampled.sampled == 20
    assert abs(sampled.positions - exact.positions) < 4 * sampled.positions_stderr
    assert exact.sum_squared_lengths > exact.tokens**2 / 60  # Σ L² ≥ (Σ L)² / n


def test_cli_plan_json_from_a_config_file(tmp_path, smollm2_path, capsys):
    from pipeline.cli import main

    data = _write_conversations(tmp_path / "d.jsonl", 12)
    config = config_path("llama-3.1-70b")
    assert main(["plan", "--target", str(config), "--data", str(data), "--k", "32", "--features", "aux",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["placement"]["gpus_per_worker"] == 2 and plan["placement"]["workers_per_node"] == 4
    assert plan["data"]["sequences"] == 12 and plan["data"]["exact"]
    assert plan["cache_bytes"]["features"]["aux"] > 100 * plan["cache_bytes"]["core"]
    assert plan["target_pass"]["gpu_hours"] > 0
    assert main(["plan", "--target", "nope", "--data", str(data)]) == 2
    assert "unknown target" in capsys.readouterr().err


def test_cli_plan_text_names_the_placement_and_sizes(tmp_path, smollm2_path, capsys):
    from pipeline.cli import main

    data = _write_conversations(tmp_path / "d.jsonl", 5)
    assert main(["plan", "--target", "qwen3-235b-a22b", "--data", str(data), "--gpu-memory-gib", "141"]) == 0
    out = capsys.readouterr().out
    assert "4 GPU(s) per target worker, 2 worker(s) per 8-GPU node" in out
    assert "B per trained position" in out and "GPU-hours" in out
