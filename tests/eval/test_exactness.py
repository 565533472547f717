"""T = 0 exactness: a difference from target greedy at a near-tie of the target's logits is told apart."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval.exactness import TIE_STEPS, divergence, first_difference, logit_step

PROMPT = [1, 2, 3]
TIED, TWIN, NEAR, OTHER, TWO_STEPS, THREE_STEPS = 5, 7, 9, 11, 13, 14  # ids whose lm_head rows the fixture sets


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama whose next-token logits after PROMPT are: TIED = TWIN (exact tie, on top),
    NEAR = top × (1 − 1e-3) (within one bf16 step, far outside fp32's), TWO_STEPS / THREE_STEPS = top − 1.5 /
    3.5 bf16 steps at 8 (2^-4 each), OTHER and the rest 0."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([PROMPT])).last_hidden_state[0, -1]
        head = torch.zeros_like(model.lm_head.weight)
        direction = 8.0 * hidden / hidden.norm() ** 2  # top logit = 8
        head[TIED] = head[TWIN] = direction
        head[NEAR] = direction * (1 - 1e-3)
        head[TWO_STEPS] = direction * (1 - 1.5 * 2.0 ** -4 / 8)
        head[THREE_STEPS] = direction * (1 - 3.5 * 2.0 ** -4 / 8)
        model.lm_head.weight.copy_(head)
    return model


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_logit_step_is_the_dtype_spacing_at_that_magnitude():
    assert logit_step("bf16", 10.0) == 2.0 ** -4  # 10 in [8, 16): 8 × 2^-7
    assert logit_step("fp32", 10.0) == 2.0 ** -20
    assert logit_step("bf16", -0.75) == 2.0 ** -8 and logit_step("fp32", 0.0) == 0.0


def test_equal_outputs_have_no_divergence(model):
    assert divergence(model, PROMPT, [TIED, 4], [TIED, 4], "fp32") is None


def test_an_exact_tie_is_a_near_tie(model):
    found = divergence(model, PROMPT, [TIED, 4], [TWIN, 4], "fp32")
    assert (found["position"], found["greedy_token"], found["output_token"]) == (0, TIED, TWIN)
    assert found["gap"] == pytest.approx(0.0, abs=1e-5) and found["near_tie"]


def test_a_token_far_below_the_top_differs(model):
    found = divergence(model, PROMPT, [TIED], [OTHER], "bf16")
    assert found["gap"] == pytest.approx(8.0, rel=1e-3) and not found["near_tie"]


def test_the_tolerance_is_the_decode_dtypes_rounding(model):
    # A gap of 0.008 at a top logit of 8: far above fp32's step (2^-20), below bf16's (2^-4).
    assert not divergence(model, PROMPT, [TIED], [NEAR], "fp32")["near_tie"]
    assert divergence(model, PROMPT, [TIED], [NEAR], "bf16")["near_tie"]
    in_bf16 = divergence(model.to(torch.bfloat16), PROMPT, [TIED], [NEAR], "bf16")
    model.float()
    assert in_bf16["near_tie"] and in_bf16["gap"] <= logit_step("bf16", 8.0)


def test_two_logits_each_rounded_by_a_step_can_flip_within_two_steps_not_more(model):
    assert TIE_STEPS == 2
    within = divergence(model, PROMPT, [TIED], [TWO_STEPS], "bf16")
    # (another test rounds the module's weights to bf16 and back: gaps within ±0.3 step of their design)
    assert within["gap"] == pytest.approx(1.5 * 2.0 ** -4, abs=0.3 * 2.0 ** -4) and within["near_tie"]
    beyond = divergence(model, PROMPT, [TIED], [THREE_STEPS], "bf16")
    assert beyond["gap"] == pytest.approx(3.5 * 2.0 ** -4, abs=0.3 * 2.0 ** -4) and not beyond["near_tie"]
    assert not divergence(model, PROMPT, [TIED], [TWO_STEPS], "fp32")["near_tie"]


def test_a_length_difference_is_never_a_near_tie(model):
    found = divergence(model, PROMPT, [TIED, 4], [TIED], "bf16")
    assert found["position"] == 1 and found["gap"] is None and not found["near_tie"]
