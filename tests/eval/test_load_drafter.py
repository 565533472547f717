"""eval.load_drafter: one loader for a run directory or an export of every drafter family."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval import load_drafter
from eval.speculative import speculative_generate
from trainer.drafters import DrafterError, DrafterMismatchError, family_of_model
from trainer.drafters.eagle3.export import save_eagle3
from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
from trainer.drafters.medusa import MedusaConfig, MedusaModel, save_medusa
from trainer.drafters.mlp import MLPSpeculator, MLPSpeculatorConfig, save_mlp_speculator


def tiny_llama(seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False)).eval()


def save_every_family(out, target) -> dict[str, object]:
    """One export per family for `target`, under out/<family>; returns the saved models."""
    torch.manual_seed(0)
    models = {
        "independent": tiny_llama(1),
        "eagle3": Eagle3Model(Eagle3Config(vocab_size=128, draft_vocab_size=100, hidden_size=32, target_hidden_size=32,
                                           intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                           aux_layers=(0, 1, 2))),
        "medusa": MedusaModel(MedusaConfig(hidden_size=32, vocab_size=128, num_heads=2, draft_vocab_size=100)),
        "mlp": MLPSpeculator(MLPSpeculatorConfig(emb_dim=32, vocab_size=128, inner_dim=16, n_predict=2)),
    }
    models["medusa"].set_draft_vocab(torch.arange(100) + 28)
    models["independent"].save_pretrained(out / "independent")
    save_eagle3(models["eagle3"], out / "eagle3")
    save_medusa(models["medusa"], out / "medusa")
    save_mlp_speculator(models["mlp"], out / "mlp")
    return models


def test_every_family_loads_from_an_export_or_a_run_directory_and_decodes(tmp_path):
    target = tiny_llama(0)
    models = save_every_family(tmp_path, target)
    run = tmp_path / "runs" / "medusa-kl"
    (run).mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"loss": "kl"}))
    save_medusa(models["medusa"], run / "model")
    for kind, path in [(k, tmp_path / k) for k in models] + [("medusa", run)]:
        drafter = load_drafter(path, target)
        assert family_of_model(drafter).name == kind and not drafter.training
        assert next(drafter.parameters()).dtype == torch.float32
        saved = dict(models[kind].named_parameters())
        for name, p in drafter.named_parameters():
            assert torch.equal(p, saved[name]), (kind, name)
        expected = target.generate(torch.tensor([[3, 4, 5]]), do_sample=False, max_new_tokens=10, pad_token_id=0,
                                   attention_mask=torch.ones(1, 3))[0, 3:].tolist()
        output, _ = speculative_generate(target, drafter, torch.tensor([3, 4, 5]), k=3, temperature=0.0,
                                         max_new_tokens=10)
        assert output.tolist() == expected, kind


def test_a_drafter_for_another_target_or_no_drafter_is_refused(tmp_path):
    save_every_family(tmp_path, tiny_llama(0))
    wider = tiny_llama(0, hidden=48)
    for kind in ("eagle3", "medusa", "mlp"):
        with pytest.raises(DrafterMismatchError, match="target hidden size 48, drafter expects 32"):
            load_drafter(tmp_path / kind, wider)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DrafterError, match="holds no drafter"):
        load_drafter(tmp_path / "empty", wider)
