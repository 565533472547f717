"""eval.attention: SDPA reads grouped KV heads in place under a mask on a CPU, with the same logits."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

from eval.attention import FORCE_GQA, use_grouped_kv_heads_on_cpu
from trainer.drafters.causal_lm import forward, rollback


@pytest.fixture
def no_user_setting(monkeypatch):
    """FORCE_GQA unset during the test, and restored (to unset too) after it, whatever the code sets."""
    monkeypatch.setenv(FORCE_GQA, "")  # records the value before: teardown restores it
    monkeypatch.delenv(FORCE_GQA)


def verification_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a 3-token forward over a KV cache of the first tokens (the masked, multi-token case)."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        forward(model, ids[:-3], cache, 1)
        rollback(cache, ids.numel() - 3)
        return forward(model, ids[-3:], cache, 3)[0]


def test_on_a_cpu_masked_gqa_attention_skips_the_copy_and_gives_the_same_logits(no_user_setting):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (12,))
    key = value = torch.zeros(1, 2, 12, 8)
    mask = torch.ones(1, 1, 3, 12, dtype=torch.bool)
    assert not use_gqa_in_sdpa(mask, key, value)  # transformers' default: repeat_kv under a mask
    copied = verification_logits(model, ids)
    assert use_grouped_kv_heads_on_cpu("cpu") and use_gqa_in_sdpa(mask, key, value)
    torch.testing.assert_close(verification_logits(model, ids), copied, rtol=0, atol=1e-6)


def test_the_users_setting_wins_and_a_gpu_is_left_alone(no_user_setting, monkeypatch):
    assert not use_grouped_kv_heads_on_cpu("cuda")
    monkeypatch.setenv(FORCE_GQA, "0")
    assert not use_grouped_kv_heads_on_cpu("cpu")


def test_the_variable_does_not_leak_out_of_these_tests():
    import os

    assert FORCE_GQA not in os.environ
