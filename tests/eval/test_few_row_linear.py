"""eval.few_row_linear: the same products as nn.Linear for few rows, only on fp32 CPU layers, still lossless."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from eval.few_row_linear import MAX_ROWS, FewRowLinear, set_few_row_gemm
from eval.speculative import speculative_generate


def tiny_target(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1,
    )).eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 32), (2, 32), (1, 3, 32), (2, 2, 32), (1, MAX_ROWS + 1, 32)])
def test_few_row_products_equal_nn_linear_and_skip_its_path_up_to_max_rows(shape, bias, monkeypatch):
    torch.manual_seed(1)
    reference = nn.Linear(32, 48, bias=bias)
    layer = nn.Linear(32, 48, bias=bias)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(*shape)
    expected = reference(x)
    assert set_few_row_gemm(layer, True) == 1 and type(layer) is FewRowLinear
    if x.numel() // 32 <= MAX_ROWS:  # the few-row path never reaches nn.Linear's product
        monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: pytest.fail("nn.Linear's path was taken"))
    out = layer(x)
    assert out.shape == (*shape[:-1], 48) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_only_fp32_cpu_linear_layers_change_and_tied_weights_stay_tied():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = tiny_target(tied=True)
    linears = sum(type(layer) is nn.Linear for layer in model.modules())
    assert set_few_row_gemm(model, True) == linears == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set_few_row_gemm(model, True) == 0  # already converted
    assert set_few_row_gemm(model.to(torch.bfloat16), False) == linears  # turned back after a move too
    assert type(model.lm_head) is nn.Linear
    assert set_few_row_gemm(model, True) == 0  # bf16
    assert set_few_row_gemm(nn.Linear(4, 4, device="meta"), True) == 0
    hooked = nn.Linear(4, 4)
    add_hook_to_module(hooked, ModelHook())  # its saved forward would bypass the change
    assert set_few_row_gemm(hooked, True) == 0


@pytest.mark.parametrize("k", [1, 3, MAX_ROWS - 1, 7])
def test_speculative_decoding_with_converted_layers_stays_greedy_identical(k):
    target = tiny_target(tied=False)
    close = tiny_target(tied=False)  # accepts some drafts and rejects others: every verification length
    with torch.no_grad():
        for param in close.parameters():
            param.add_(0.05 * torch.randn_like(param))
    assert set_few_row_gemm(target, True) == set_few_row_gemm(close, True) == 15
    for prompt in ([5, 17, 42], [100, 3, 3, 9]):
        greedy = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, pad_token_id=0,
                                 eos_token_id=None, attention_mask=torch.ones(1, len(prompt)))[0, len(prompt):]
        for drafter in (target, close):
            output, stats = speculative_generate(target, drafter, torch.tensor(prompt), k=k, temperature=0.0,
                                                 max_new_tokens=20)
            assert output.tolist() == greedy.tolist(), (k, prompt)
            assert stats["accepted"] + stats["target_forwards"] == 20
