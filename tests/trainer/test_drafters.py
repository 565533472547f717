"""Drafter builders and the loop's components (no Ray, no DeepSpeed)."""
from __future__ import annotations

import pytest
import torch

from cache import CacheMismatchError, open_cache
from trainer.data import BatchStream, LoaderSpec, heldout_split, scan_index
from trainer.drafters import (PRESETS, Drafter, DrafterError, DrafterSpec, IndependentDrafter, build_drafter,
                              load_input_embeddings, parse_arch_overrides, resolve_drafter_spec)
from trainer.loop import TargetSource, probe_inputs, select_rows, warmup_cosine
from trainer.losses import DenseTarget, SparseTarget

VOCAB = 49152
TOKENS = {"bos": 1, "eos": 2, "pad": 2}
SMALL = {"layers": 1, "hidden": 64, "heads": 2, "kv_heads": 2, "intermediate": 128}


def _spec(**overrides) -> DrafterSpec:
    return resolve_drafter_spec("tiny", {**SMALL, **overrides}, vocab_size=VOCAB, token_ids=TOKENS, max_positions=256)


@pytest.fixture(scope="module")
def batch(tiny_cache):
    reader = open_cache(tiny_cache)
    split = heldout_split(scan_index(reader), 0.1, 8)
    stream = BatchStream(reader, LoaderSpec(0, 1, 0, 160, split.heldout_threshold), prefetch=1)
    try:
        return next(stream)
    finally:
        stream.close()


def test_presets_and_overrides_build_llama_drafters_with_the_cache_vocabulary():
    spec = resolve_drafter_spec("tiny", {}, vocab_size=VOCAB, token_ids=TOKENS, max_positions=512)
    assert spec.hf_config["num_hidden_layers"] == PRESETS["tiny"]["layers"] and spec.hf_config["vocab_size"] == VOCAB
    assert spec.label == "tiny" and spec.source == "config"
    drafter = build_drafter(_spec(layers=2))
    assert isinstance(drafter, Drafter) and drafter.kind == "independent" and drafter.required_columns == ()
    assert drafter.model.config.num_hidden_layers == 2 and drafter.vocab_size == VOCAB
    assert _spec(layers=2).label == "tiny+heads=2+hidden=64+intermediate=128+kv_heads=2+layers=2"
    assert parse_arch_overrides("layers=3, hidden=96,tie_embeddings=false") == {
        "layers": 3, "hidden": 96, "tie_embeddings": False}


@pytest.mark.parametrize("text, message", [
    ("layers=0", "layers must be > 0"),
    ("width=3", "bad item 'width=3'"),
    ("layers", "bad item 'layers'"),
])
def test_bad_drafter_config_names_the_flag(text, message):
    with pytest.raises(DrafterError, match=message):
        parse_arch_overrides(text)


def test_inconsistent_heads_and_unknown_drafters_are_refused(tmp_path):
    with pytest.raises(DrafterError, match="multiple of heads=3"):
        _spec(heads=3)
    with pytest.raises(DrafterError, match="must be a preset .* or a Hugging Face model directory"):
        resolve_drafter_spec(str(tmp_path / "nope"), {}, vocab_size=VOCAB, token_ids=TOKENS, max_positions=64)


def test_step_logits_are_the_full_model_logits_at_the_trained_positions(batch):
    torch.manual_seed(0)
    drafter = build_drafter(_spec()).eval()
    with torch.no_grad():
        [step] = drafter(batch.model_inputs())
        full = drafter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert step.rows is None and step.logits.shape == (batch.num_targets, VOCAB)
    torch.testing.assert_close(step.logits, full[batch.target_batch, batch.target_pos], atol=1e-5, rtol=1e-5)


def test_export_reloads_with_automodel_and_the_same_logits(tmp_path, tiny_target_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    drafter = build_drafter(_spec())
    drafter.export(tmp_path / "model", tiny_target_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    probe = probe_inputs(VOCAB, seed=0)
    with torch.no_grad():
        [step] = drafter.eval()(probe.model_inputs())
        logits = reloaded(input_ids=probe.input_ids).logits.reshape(-1, VOCAB)
    torch.testing.assert_close(logits, step.logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "model").get_vocab() == \
        AutoTokenizer.from_pretrained(tiny_target_dir).get_vocab()


def test_embeddings_can_start_from_the_target(tiny_target_dir):
    target_embeddings = load_input_embeddings(tiny_target_dir)  # [V, 32]
    spec = resolve_drafter_spec("tiny", {"layers": 1, "heads": 2, "kv_heads": 2}, vocab_size=VOCAB,
                                token_ids=TOKENS, max_positions=64, init_embeddings=(str(tiny_target_dir), 32))
    assert spec.hf_config["hidden_size"] == 32  # the target's width
    drafter = build_drafter(spec)
    assert torch.equal(drafter.model.get_input_embeddings().weight, target_embeddings)
    with pytest.raises(DrafterError, match="width 32, the drafter has hidden=64"):
        resolve_drafter_spec("tiny", SMALL, vocab_size=VOCAB, token_ids=TOKENS, max_positions=64,
                             init_embeddings=(str(tiny_target_dir), 32))


def test_a_drafter_directory_must_match_the_cache_vocabulary(tiny_target_dir):
    spec = resolve_drafter_spec(str(tiny_target_dir), {}, vocab_size=VOCAB, token_ids=TOKENS, max_positions=64)
    assert spec.source == "dir" and isinstance(build_drafter(spec), IndependentDrafter)
    with pytest.raises(CacheMismatchError, match="vocabulary size 50000, drafter .* has vocab_size 49152"):
        resolve_drafter_spec(str(tiny_target_dir), {}, vocab_size=50000, token_ids=TOKENS, max_positions=64)
    with pytest.raises(DrafterError, match="only applies to presets"):
        resolve_drafter_spec(str(tiny_target_dir), {"layers": 2}, vocab_size=VOCAB, token_ids=TOKENS,
                             max_positions=64)


def test_online_target_supplies_the_full_distribution_the_cache_truncated(batch, tiny_target_dir):
    online = TargetSource("online", str(tiny_target_dir), "fp32", torch.device("cpu"))(batch)
    cached = TargetSource("cache", None, "fp32", torch.device("cpu"))(batch)
    assert isinstance(online, DenseTarget) and isinstance(cached, SparseTarget)
    logprobs = online.logits.log_softmax(-1)
    top = logprobs.topk(cached.ids.shape[1])
    assert torch.equal(top.indices, cached.ids)
    torch.testing.assert_close(top.values, cached.logprobs, atol=2e-2, rtol=1e-2)  # cache stores fp16
    rows = torch.tensor([2, 0])
    assert torch.equal(select_rows(cached, rows).ids, cached.ids[rows])
    assert torch.equal(select_rows(online, rows).logits, online.logits[rows])


def test_learning_rate_warms_up_then_decays_to_zero():
    schedule = warmup_cosine(total_steps=10, warmup=4)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == 1.0 and schedule(9) < schedule(6) < 1.0 and schedule(10) == pytest.approx(0.0)
    assert warmup_cosine(10, 0)(0) == 1.0


# --- the family registry ----------------------------------------------------------------------

def test_families_are_looked_up_by_name_drafter_value_directory_and_model(tmp_path, tiny_target_dir):
    from transformers import AutoModelForCausalLM

    from trainer.drafters import FAMILIES, family, family_for, family_of_dir, family_of_model
    from trainer.drafters.medusa import MedusaConfig, MedusaModel, save_medusa

    assert [f.name for f in FAMILIES] == ["eagle3", "medusa", "mlp", "independent"]
    assert {f.name: f.default_eta for f in FAMILIES} == {"eagle3": 3.0, "medusa": 10.0, "mlp": 3.0, "independent": 3.0}
    assert {f.name: f.columns for f in FAMILIES} == {"eagle3": ("aux",), "medusa": ("last",), "mlp": ("last",),
                                                    "independent": ()}
    for value, name in [("eagle3", "eagle3"), ("eagle3:steps=2", "eagle3"), ("medusa:heads=2", "medusa"),
                        ("mlp", "mlp"), ("tiny", "independent"), ("/some/dir", "independent"),
                        ("medusas", "independent"), ("mlp2:x=1", "independent")]:
        assert family_for(value).name == name, value
        assert family(name).name == name
    for f in FAMILIES:
        if f.options:
            assert f.parse(f.example) and f.matches(f.example)  # the example in messages is valid
    with pytest.raises(DrafterError, match="unknown drafter kind 'hydra'; known: eagle3, medusa, mlp, independent"):
        family("hydra")
    save_medusa(MedusaModel(MedusaConfig(hidden_size=8, vocab_size=16, num_heads=2)), tmp_path / "m")
    assert family_of_dir(tmp_path / "m").name == "medusa" and family_of_dir(tiny_target_dir).name == "independent"
    assert family_of_model(AutoModelForCausalLM.from_pretrained(tiny_target_dir)).name == "independent"


@pytest.mark.parametrize("drafter, title", [("eagle3", "EAGLE-3"), ("medusa", "MEDUSA"), ("mlp", "MLP speculator")])
def test_drafter_config_is_refused_for_families_with_their_own_options(drafter, title):
    from trainer.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=f"--drafter-config does not apply to {title} drafters: give their options "
                                          f"in --drafter, e.g. --drafter {drafter}:"):
        TrainConfig(cache="c", out="o", drafter=drafter, drafter_config={"layers": 2}).validate()
