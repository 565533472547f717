"""Decoder statistics: τ per target forward, τ as the paper computes it, and `accepted` when an EOS cuts a step."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval.speculative import merge_stats, new_stats, record_step, speculative_generate
from trainer.losses import expected_tau

PROMPT = torch.tensor([5, 17, 42])


@pytest.fixture(scope="module")
def target():
    """A random tiny Llama (vocab 64) with peaked distributions; drafting with itself accepts every draft at T = 0."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def one_hot(ids: list[int], vocab: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()


def test_paper_tau_counts_accepted_over_drafted_of_the_drafting_steps_only():
    stats = new_stats(3)
    record_step(stats, one_hot([0]), None, 0, 0)  # a forward over the prompt that verifies no draft
    record_step(stats, one_hot([0, 1, 2, 3]), one_hot([0, 1, 3]), 3, 2)  # 2 of 3 accepted, then a resample
    record_step(stats, one_hot([2, 2, 2, 2]), one_hot([1, 2, 2]), 3, 0)  # the first draft rejected
    merged = merge_stats([stats | {"new_tokens": 4}])
    assert (merged["drafted"], merged["accepted"], merged["target_forwards"]) == (6, 2, 3)
    assert merged["tau_paper"] == pytest.approx(3 * 2 / 6 + 1)  # K·accepted/drafted + 1: the first forward not counted
    assert merged["tau"] == pytest.approx(4 / 3)  # tokens per target forward counts it
    assert merged["accepted_by_position"] == [1, 1, 0] and merged["reached_by_position"] == [2, 1, 1]
    assert merged["expected_tau"] == pytest.approx(expected_tau([0.5, 1.0, 0.5]))


def test_paper_tau_takes_k_from_the_positions_a_drafter_reaches():
    stats = new_stats(4)  # the decoder asks for 4 drafts, the drafter has 2 heads
    for accepted in (2, 1):
        record_step(stats, one_hot([0, 1, 2]), one_hot([0, 1] if accepted == 2 else [0, 2]), 2, accepted)
    merged = merge_stats([stats | {"new_tokens": 5}])
    assert merged["tau_paper"] == pytest.approx(2 * 3 / 4 + 1) and merged["verified_by_position"] == [2, 2, 0, 0]


def test_a_drafter_identical_to_the_target_reaches_k_plus_one(target):
    output, stats = speculative_generate(target, target, PROMPT, k=3, temperature=0.0, max_new_tokens=14)
    # steps draft 3, 3, 3 then 1 (never past max_new_tokens): 4 + 4 + 4 + 2 tokens, every draft accepted
    assert output.numel() == 14 and stats["target_forwards"] == 4
    assert stats["drafted"] == stats["accepted"] == 10
    assert stats["tau_paper"] == pytest.approx(3 * 10 / 10 + 1) and stats["tau"] == pytest.approx(14 / 4)
    assert "last_step" not in stats


def test_baseline_paper_tau_is_one(target):
    _, stats = speculative_generate(target, None, PROMPT, k=3, temperature=0.0, max_new_tokens=5)
    assert stats["tau_paper"] == 1.0 and stats["drafted"] == 0 and stats["tau"] == 1.0


def test_accepted_drafts_after_an_eos_are_not_counted(target):
    free, _ = speculative_generate(target, None, PROMPT, k=0, temperature=0.0, max_new_tokens=8)
    free = free.tolist()
    # K = 3 with the target as drafter: step 1 accepts drafts free[0..2] and adds free[3]. An EOS at free[1]
    # (its first occurrence) is an accepted draft: free[2] and free[3] are cut from the output.
    eos = free[1]
    assert eos not in free[:1], "pick another prompt: the EOS must first occur at position 1"
    output, stats = speculative_generate(target, target, PROMPT, k=3, temperature=0.0, max_new_tokens=8,
                                         eos_token_id=eos)
    assert output.tolist() == free[:2] and stats["new_tokens"] == 2 and stats["target_forwards"] == 1
    assert stats["accepted"] == 2 and stats["drafted"] == 2  # the step counts as drafting up to the EOS
    assert stats["accepted_by_position"] == [1, 1, 0] and stats["reached_by_position"] == [1, 1, 0]
    assert stats["verified_by_position"] == [1, 1, 0] and stats["alpha_sum_by_position"][2] == 0
    assert stats["accepted"] + stats["target_forwards"] - 1 == stats["new_tokens"]  # the target's own token was cut
    assert stats["tau_paper"] == pytest.approx(2 * 2 / 2 + 1)  # K = 2: the positions verified, once cut


def test_an_eos_from_the_target_cuts_nothing(target):
    free, _ = speculative_generate(target, None, PROMPT, k=0, temperature=0.0, max_new_tokens=8)
    free = free.tolist()
    eos = free[3]  # the bonus token of step 1
    if eos in free[:3]:
        pytest.skip("the EOS must first occur at position 3")
    output, stats = speculative_generate(target, target, PROMPT, k=3, temperature=0.0, max_new_tokens=8,
                                         eos_token_id=eos)
    assert output.tolist() == free[:4]
    assert stats["accepted"] == stats["drafted"] == 3 and stats["accepted"] + stats["target_forwards"] == 4
