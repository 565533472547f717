"""The EAGLE-3 export against the layout vLLM and SGLang load, and its exact round trip.

The specification below is written from the serving engines' loaders, independently of
trainer/eagle3_export.py: vLLM `vllm/model_executor/models/llama_eagle3.py` (Eagle3LlamaForCausalLM:
`midlayer.` -> `layers.0.`, q/k/v and gate/up stacked, `d2t` -> `draft_id_to_target_id`, target id of
draft id i = i + d2t[i], `t2d` skipped; fc input 3 × target_hidden_size; qkv input 2 × hidden_size),
vLLM `eagle3_utils.get_eagle3_aux_layers_from_config` (top-level `eagle_aux_hidden_state_layer_ids`,
indices = inputs of decoder layers) and SGLang `llama_eagle3.py` (`LlamaForCausalLMEagle3`,
hot_token_id = d2t + arange; `eagle_config["eagle_aux_hidden_state_layer_ids"]` are layer outputs,
captured at layer id + 1).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
from trainer.drafters.eagle3.train import Eagle3Drafter
from trainer.drafters.eagle3.export import Eagle3FormatError, is_eagle3_dir, load_eagle3, save_eagle3

CONFIG = Eagle3Config(vocab_size=320, draft_vocab_size=48, hidden_size=48, target_hidden_size=40,
                      intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, aux_layers=(2, 8, 13),
                      rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=512)


def expected_tensors(c: Eagle3Config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint tensor name -> (shape, dtype) of a one-layer EAGLE-3 Llama drafter, float weights in fp32."""
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    f32 = torch.float32
    return {
        "fc.weight": ((d, 3 * c.target_hidden_size), f32),
        "midlayer.input_layernorm.weight": ((d,), f32),
        "midlayer.hidden_norm.weight": ((d,), f32),
        "midlayer.post_attention_layernorm.weight": ((d,), f32),
        "midlayer.self_attn.q_proj.weight": ((q, 2 * d), f32),
        "midlayer.self_attn.k_proj.weight": ((kv, 2 * d), f32),
        "midlayer.self_attn.v_proj.weight": ((kv, 2 * d), f32),
        "midlayer.self_attn.o_proj.weight": ((d, q), f32),
        "midlayer.mlp.gate_proj.weight": ((c.intermediate_size, d), f32),
        "midlayer.mlp.up_proj.weight": ((c.intermediate_size, d), f32),
        "midlayer.mlp.down_proj.weight": ((d, c.intermediate_size), f32),
        "norm.weight": ((d,), f32),
        "lm_head.weight": ((c.draft_vocab_size, d), f32),
        "embed_tokens.weight": ((c.vocab_size, d), f32),
        "d2t": ((c.draft_vocab_size,), torch.int64),
        "t2d": ((c.vocab_size,), torch.bool),
    }


def vllm_parameter_name(name: str) -> str | None:
    """What vLLM's Eagle3LlamaForCausalLM.load_weights does with a checkpoint name (None: skipped)."""
    if "t2d" in name:
        return None
    if "d2t" in name:
        return name.replace("d2t", "draft_id_to_target_id")
    name = name if "lm_head" in name else "model." + name
    name = name.replace("midlayer.", "layers.0.")
    for shard, stacked in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
        name = name.replace(shard, stacked)
    return name


# The parameters of vLLM's Eagle3LlamaForCausalLM with one layer and aux hidden states.
VLLM_PARAMETERS = {
    "model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight", "draft_id_to_target_id",
    "model.layers.0.input_layernorm.weight", "model.layers.0.hidden_norm.weight",
    "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.qkv_proj.weight",
    "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
}


@pytest.fixture(scope="module")
def model() -> Eagle3Model:
    torch.manual_seed(0)
    model = Eagle3Model(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones: a swapped norm would show
    model.set_draft_vocab(torch.randperm(CONFIG.vocab_size)[:CONFIG.draft_vocab_size].sort().values)
    return model.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    save_eagle3(model, out)
    return out


def test_config_has_the_keys_the_serving_engines_read(exported):
    config = json.loads((exported / "config.json").read_text())
    c = CONFIG
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    expected = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                "num_hidden_layers": 1, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
                "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
                "draft_vocab_size": c.draft_vocab_size, "target_hidden_size": c.target_hidden_size,
                "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
                "eagle_aux_hidden_state_layer_ids": [2, 8, 13]}
    assert {key: config.get(key) for key in expected} == expected
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 7, 12]  # SGLang: layer outputs
    assert config["lkspec"]["aux_layers"] == [2, 8, 13] and config["lkspec"]["format"] == "eagle3"


def test_weights_match_the_specification_and_vllms_parameters(exported, model):
    with safe_open(str(exported / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    spec = expected_tensors(CONFIG)
    assert sorted(tensors) == sorted(spec)
    for name, (shape, dtype) in spec.items():
        assert (tuple(tensors[name].shape), tensors[name].dtype) == (shape, dtype), name
    assert {vllm_parameter_name(n) for n in tensors} - {None} == VLLM_PARAMETERS
    # d2t holds offsets (vLLM / SGLang: target id = draft id + d2t); t2d marks the same ids.
    targets = torch.arange(CONFIG.draft_vocab_size) + tensors["d2t"]
    assert torch.equal(targets, model.draft_ids)
    assert torch.equal(torch.nonzero(tensors["t2d"]).view(-1), model.draft_ids)
    assert torch.equal(tensors["fc.weight"], model.fc.weight)


def test_round_trip_reproduces_every_steps_logits_exactly(exported, model):
    generator = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, CONFIG.vocab_size, (2, 9), generator=generator),
             "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "target_batch": torch.arange(2).repeat_interleave(8), "target_pos": torch.arange(8).repeat(2),
             "aux": torch.randn(2, 9, 3 * CONFIG.target_hidden_size, generator=generator)}
    assert is_eagle3_dir(exported) and not is_eagle3_dir(exported.parent)
    reloaded = load_eagle3(exported)
    assert not reloaded.training and reloaded.fc.weight.dtype == torch.float32
    assert reloaded.config == CONFIG
    with torch.no_grad():
        before, after = Eagle3Drafter(model, 4)(batch), Eagle3Drafter(reloaded, 4)(batch)
    for a, b in zip(before, after):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.logits, b.logits)


def test_bf16_export_keeps_its_dtype_and_loads_as_fp32(model, tmp_path):
    import copy

    save_eagle3(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert handle.get_tensor("d2t").dtype == torch.int64
    reloaded = load_eagle3(tmp_path / "bf16")
    assert reloaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())


def test_a_broken_export_is_refused_naming_the_tensor(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((exported / "config.json").read_text())
    tensors = load_file(str(exported / "model.safetensors"))
    del tensors["midlayer.hidden_norm.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(Eagle3FormatError, match="missing tensors \\['midlayer.hidden_norm.weight'\\]"):
        load_eagle3(broken)
    config = json.loads((exported / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(Eagle3FormatError, match="num_hidden_layers=2"):
        load_eagle3(broken)
