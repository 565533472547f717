"""The speculative decoder is lossless with every drafter family: greedy-identical at T = 0, target-distributed at T > 0."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

import eval.speculative as spec
from trainer.drafters import DrafterMismatchError, causal_lm
from trainer.drafters.eagle3.decode import Eagle3MismatchError
from eval.speculative import accept, merge_stats, speculative_generate
from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
from trainer.drafters.medusa import MedusaConfig, MedusaModel
from trainer.drafters.mlp import MLPSpeculator, MLPSpeculatorConfig


def tiny_llama(seed: int, vocab: int, *, hidden: int = 32, layers: int = 2, init: float = 0.02,
               tied: bool = True) -> LlamaForCausalLM:
    """A random-weight Llama small enough to decode thousands of tokens per second."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=init, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair():
    """Target (vocab 256) and drafters from perfect to useless, one with a wider (padded) vocabulary."""
    torch.set_num_threads(1)
    target = tiny_llama(0, 256, init=0.2, tied=False)
    close = tiny_llama(0, 256, init=0.2, tied=False)
    with torch.no_grad():
        for param in close.parameters():
            param.add_(0.05 * torch.randn_like(param))
    drafters = {
        "self": target,
        "close": close,
        "random": tiny_llama(1, 256, init=0.2, tied=False),
        "wider-vocab": tiny_llama(2, 264, init=0.2, tied=False),
    }
    return target, drafters


PROMPTS = [[5, 17, 42], [200, 3, 3, 3, 9, 81, 7], [11]]


def greedy_reference(target, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("drafter_name", ["self", "close", "random", "wider-vocab"])
def test_greedy_output_equals_target_greedy(pair, drafter_name, k):
    target, drafters = pair
    for prompt in PROMPTS:
        expected = greedy_reference(target, prompt, 24, eos=None)
        output, stats = speculative_generate(target, drafters[drafter_name], torch.tensor(prompt), k=k,
                                             temperature=0.0, max_new_tokens=24)
        assert output.tolist() == expected, (drafter_name, k, prompt)
        assert output.dtype == torch.long and output.dim() == 1
        assert stats["new_tokens"] == 24
        assert stats["tau"] == pytest.approx(24 / stats["target_forwards"])
        assert stats["accepted"] + stats["target_forwards"] == 24  # every forward adds one target token


def test_drafter_quality_shows_in_acceptance(pair):
    target, drafters = pair
    taus = {}
    for name in ("self", "close", "random"):
        _, stats = speculative_generate(target, drafters[name], torch.tensor(PROMPTS[1]), k=3,
                                        temperature=0.0, max_new_tokens=40)
        taus[name] = stats["tau"]
    assert taus["self"] == 4.0 and taus["self"] > taus["close"] > taus["random"] >= 1.0


def test_perfect_drafter_statistics(pair):
    target, _ = pair
    _, stats = speculative_generate(target, target, torch.tensor(PROMPTS[0]), k=3, temperature=0.0,
                                    max_new_tokens=12)
    assert stats["target_forwards"] == 3 and stats["tau"] == 4.0
    assert stats["accepted_by_position"] == stats["reached_by_position"] == [3, 3, 3]
    assert stats["expected_tau"] == pytest.approx(4.0)  # alpha = 1 at every position
    assert stats["drafted"] == stats["accepted"] == 9


def test_baseline_is_the_same_path_with_no_drafter(pair):
    target, drafters = pair
    expected = greedy_reference(target, PROMPTS[1], 10, eos=None)
    for drafter, k in ((None, 7), (drafters["close"], 0)):
        output, stats = speculative_generate(target, drafter, torch.tensor(PROMPTS[1]), k=k,
                                             temperature=0.0, max_new_tokens=10)
        assert output.tolist() == expected
        assert stats["target_forwards"] == 10 and stats["tau"] == 1.0 and stats["drafted"] == 0


def test_stops_at_eos_inclusive_and_never_exceeds_max_new_tokens(pair):
    target, drafters = pair
    free_run = greedy_reference(target, PROMPTS[0], 30, eos=None)
    eos = free_run[6]
    cut = free_run.index(eos) + 1
    assert greedy_reference(target, PROMPTS[0], 30, eos=eos) == free_run[:cut]
    for name, k in itertools.product(("self", "close", "random"), (1, 3, 7)):
        output, _ = speculative_generate(target, drafters[name], torch.tensor(PROMPTS[0]), k=k,
                                         temperature=0.0, max_new_tokens=30, eos_token_id=[eos, 9999])
        assert output.tolist() == free_run[:cut], (name, k)
        for limit in (1, 2, 5):
            output, stats = speculative_generate(target, drafters[name], torch.tensor(PROMPTS[0]), k=k,
                                                 temperature=1.0, max_new_tokens=limit,
                                                 generator=torch.Generator().manual_seed(limit))
            assert output.numel() <= limit and stats["drafted"] <= (limit - 1) * k


def test_refuses_negative_temperature_k_or_an_empty_prompt(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="at least one token"):
        speculative_generate(target, target, torch.tensor([], dtype=torch.long), k=2, temperature=0.0,
                             max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, target, torch.tensor([1, 2]), k=2, temperature=-0.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="k must be"):
        speculative_generate(target, target, torch.tensor([1, 2]), k=-1, temperature=0.0, max_new_tokens=2)


def test_merge_stats_sums_counters(pair):
    target, drafters = pair
    runs = [speculative_generate(target, drafters["close"], torch.tensor(p), k=3, temperature=0.0,
                                 max_new_tokens=16)[1] for p in PROMPTS]
    merged = merge_stats(runs)
    assert merged["new_tokens"] == 48
    assert merged["target_forwards"] == sum(r["target_forwards"] for r in runs)
    assert merged["tau"] == pytest.approx(48 / merged["target_forwards"])
    assert merged["reached_by_position"] == [sum(c) for c in zip(*(r["reached_by_position"] for r in runs))]


# --- exactness of the sampling rule at T > 0 ----------------------------------------------------

def _pooled_chisquare(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square p-value, pooling cells with expected count < 5 into one (impossible cells must be empty)."""
    expected = expected_probs * observed.sum()
    assert observed[expected == 0].sum() == 0
    observed, expected = observed[expected > 0], expected[expected > 0]
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return chisquare(observed, expected).pvalue


def _accept_rule_outputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """First token emitted by accept() after a draft from q, n times (k = 1); returns counts and p."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.tensor([[0.5, 0.05, 0.25, 0.0, 0.2], [0.1, 0.2, 0.3, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.4, 0.1, 0.3, 0.1]])
    counts = np.zeros(5)
    for _ in range(n):
        draft = torch.multinomial(q[0], 1, generator=generator)
        n_accepted, token = accept(p, q, draft, generator)
        counts[int(draft) if n_accepted else int(token)] += 1
    return counts, p[0].numpy()


def test_accept_rule_emits_the_target_distribution():
    counts, p = _accept_rule_outputs(4000, seed=0)
    assert counts[3] == 0  # a token the target never emits is never accepted
    assert _pooled_chisquare(counts, p) > 1e-3


def test_accept_rule_with_a_wrong_residual_is_caught(monkeypatch):
    monkeypatch.setattr(spec, "residual_distribution", lambda p, q: p)
    counts, p = _accept_rule_outputs(4000, seed=0)
    assert _pooled_chisquare(counts, p) < 1e-6


VOCAB, PROMPT, STEPS = 8, [3, 5, 2], 3


@pytest.fixture(scope="module")
def small_vocab_pair():
    """Target and drafter over an 8-token vocabulary, far apart (alpha about 0.4)."""
    torch.set_num_threads(1)
    target = tiny_llama(0, VOCAB, hidden=16, layers=1, init=0.3, tied=False)
    drafter = tiny_llama(1, VOCAB, hidden=16, layers=1, init=0.3, tied=False)
    return target, drafter


def exact_joint(target, temperature: float, steps: int = STEPS) -> dict[tuple, float]:
    """P(first `steps` tokens) under the target's own sampling, by enumerating every prefix."""
    joint = {(): 1.0}
    with torch.no_grad():
        for _ in range(steps):
            grown = {}
            for prefix, prob in joint.items():
                logits = target(torch.tensor([PROMPT + list(prefix)])).logits[0, -1].double()
                probs = torch.softmax(logits / temperature, -1).tolist()
                grown.update({prefix + (v,): prob * probs[v] for v in range(VOCAB)})
            joint = grown
    return joint


def sample_outputs(target, drafter, n: int, temperature: float, k: int, steps: int = STEPS) -> list[tuple]:
    generator = torch.Generator().manual_seed(1234)
    return [tuple(speculative_generate(target, drafter, torch.tensor(PROMPT), k=k, temperature=temperature,
                                       max_new_tokens=steps, generator=generator)[0].tolist())
            for _ in range(n)]


def distribution_pvalues(samples: list[tuple], joint: dict[tuple, float]) -> list[float]:
    """Chi-square p-values of the joint of tokens 1-2 and the marginal of every later token (after rollbacks)."""
    steps = len(next(iter(joint)))
    first_two, later = np.zeros(VOCAB * VOCAB), np.zeros((steps - 2, VOCAB))
    for tokens, prob in joint.items():
        first_two[tokens[0] * VOCAB + tokens[1]] += prob
        later[np.arange(steps - 2), tokens[2:]] += prob
    observed_two = np.bincount([s[0] * VOCAB + s[1] for s in samples], minlength=VOCAB * VOCAB)
    pvalues = [_pooled_chisquare(observed_two, first_two)]
    for i in range(steps - 2):
        pvalues.append(_pooled_chisquare(np.bincount([s[i + 2] for s in samples], minlength=VOCAB), later[i]))
    return pvalues


def test_sampling_matches_the_target_distribution(small_vocab_pair):
    target, drafter = small_vocab_pair
    samples = sample_outputs(target, drafter, 1000, temperature=1.0, k=2)
    assert min(distribution_pvalues(samples, exact_joint(target, 1.0))) > 1e-3


def test_a_wrong_residual_fails_the_distribution_test(small_vocab_pair, monkeypatch):
    target, drafter = small_vocab_pair
    monkeypatch.setattr(spec, "residual_distribution", lambda p, q: p)  # resample from p: biased
    samples = sample_outputs(target, drafter, 400, temperature=1.0, k=2)
    assert min(distribution_pvalues(samples, exact_joint(target, 1.0))) < 1e-6


def test_sampling_at_low_temperature_matches(small_vocab_pair):
    target, drafter = small_vocab_pair
    samples = sample_outputs(target, drafter, 400, temperature=0.5, k=3)
    assert min(distribution_pvalues(samples, exact_joint(target, 0.5))) > 1e-3


# --- EAGLE-3 drafters (the drafter reads the target's hidden states) ----------------------------

def tiny_eagle3(seed: int, target, draft_vocab: int, aux_layers: tuple[int, ...]) -> Eagle3Model:
    """A random EAGLE-3 drafter for `target` over `draft_vocab` random target ids."""
    torch.manual_seed(seed)
    config = Eagle3Config(vocab_size=target.config.vocab_size, draft_vocab_size=draft_vocab, hidden_size=32,
                          target_hidden_size=target.config.hidden_size, intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=2, aux_layers=aux_layers,
                          max_position_embeddings=256)
    model = Eagle3Model(config)
    model.set_draft_vocab(torch.randperm(config.vocab_size)[:draft_vocab].sort().values)
    return model.eval()


@pytest.fixture(scope="module")
def eagle_pair():
    """A 4-layer target (vocab 256) and EAGLE-3 drafters with a reduced and with the full vocabulary."""
    torch.set_num_threads(1)
    target = tiny_llama(0, 256, layers=4, init=0.2, tied=False)
    drafters = {"reduced": tiny_eagle3(0, target, 200, (1, 2, 3)), "full": tiny_eagle3(1, target, 256, (0, 2, 4))}
    return target, drafters


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("drafter_name", ["reduced", "full"])
def test_eagle3_greedy_output_equals_target_greedy(eagle_pair, drafter_name, k):
    target, drafters = eagle_pair
    for prompt in PROMPTS:
        expected = greedy_reference(target, prompt, 24, eos=None)
        output, stats = speculative_generate(target, drafters[drafter_name], torch.tensor(prompt), k=k,
                                             temperature=0.0, max_new_tokens=24)
        assert output.tolist() == expected, (drafter_name, k, prompt)
        assert stats["accepted"] + stats["target_forwards"] == 24
        assert stats["drafted"] > 0


def record_rounds(monkeypatch) -> list[dict]:
    """Wrap the decoder's draft(): per round, the committed tokens, the drafts, q and the drafter cache sizes."""
    rounds, real_draft = [], spec.draft

    def recording(drafter, cache, tokens, k, temperature, generator, vocab):
        pending = 0 if cache.features is None else cache.features.shape[0]
        before = cache.rows
        drafts, probs = real_draft(drafter, cache, tokens, k, temperature, generator, vocab)
        rounds.append({"tokens": tokens.clone(), "drafts": drafts.clone(), "q": probs, "rows_before": before,
                       "pending": pending, "rows_after": cache.rows})
        return drafts, probs

    monkeypatch.setattr(spec, "draft", recording)
    return rounds


def test_eagle3_cache_holds_one_row_per_committed_position(eagle_pair, monkeypatch):
    target, drafters = eagle_pair
    rounds = record_rounds(monkeypatch)
    for temperature in (0.0, 1.0):
        rounds.clear()
        output, stats = speculative_generate(target, drafters["reduced"], torch.tensor(PROMPTS[1]), k=3,
                                             temperature=temperature, max_new_tokens=30,
                                             generator=torch.Generator().manual_seed(5))
        assert output.numel() == 30 and len(rounds) == stats["target_forwards"]
        first, later = rounds[0], rounds[1:]
        assert first["drafts"].numel() == 0 and first["rows_after"] == 0  # the target reads the prompt first
        assert stats["accepted"] < stats["drafted"]  # rejections happened, so rollbacks were exercised
        for r in later:
            committed = r["tokens"].numel()
            # Target states of every committed position but the newest token's are known: drafter rows
            # (+ queued states) = committed - 1 before drafting, and rows alone after it (chain rows dropped;
            # the last step drafts nothing when one token is left).
            assert r["rows_before"] + r["pending"] == committed - 1
            assert r["rows_after"] == (committed - 1 if r["drafts"].numel() else r["rows_before"])


def reference_draft_probs(model: Eagle3Model, target, tokens: torch.Tensor, drafts: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """q of each draft [k, V] recomputed without caches, the training-time-test way: step n runs every
    row t (token x_{t+n}, position t + n - 1) with a causal step-1 block and one diagonal per later step."""
    sequence = torch.cat([tokens, drafts])
    rows = tokens.numel() - 1  # rows 0 .. j, j = the last position with a target state
    with torch.no_grad():
        states = target(tokens[None], output_hidden_states=True).hidden_states
        hidden = model.fuse(torch.cat([states[i][0, :rows] for i in model.config.aux_layers], -1))[None]
        keys, values, probs = [], [], []
        for n in range(1, drafts.numel() + 1):
            blocks = [torch.ones(rows, rows).tril()] + [torch.eye(rows)] * (n - 1)
            prefix = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else None
            logits, hidden, k_n, v_n = model.step(sequence[n:n + rows][None], hidden,
                                                  torch.arange(n - 1, n - 1 + rows)[None], prefix,
                                                  torch.cat(blocks, 1).bool())
            keys.append(k_n)
            values.append(v_n)
            q = torch.zeros(target.config.vocab_size)
            q[model.draft_ids] = torch.softmax(logits[0, -1].float() / temperature, -1)
            probs.append(q)
    return torch.stack(probs)


def test_eagle3_draft_distributions_and_alpha_match_an_uncached_reference(eagle_pair, monkeypatch):
    target, drafters = eagle_pair
    drafter = drafters["reduced"]
    rounds = record_rounds(monkeypatch)
    _, stats = speculative_generate(target, drafter, torch.tensor(PROMPTS[1]), k=4, temperature=1.0,
                                    max_new_tokens=30, generator=torch.Generator().manual_seed(3))
    alpha_sums = np.zeros(4)
    for r in [r for r in rounds if r["drafts"].numel()]:
        k = r["drafts"].numel()
        expected_q = reference_draft_probs(drafter, target, r["tokens"], r["drafts"], 1.0)
        torch.testing.assert_close(r["q"], expected_q, atol=1e-5, rtol=1e-4)
        assert (r["q"][:, ~torch.isin(torch.arange(256), drafter.draft_ids)] == 0).all()
        with torch.no_grad():  # p of each draft position from one uncached target forward
            logits = target(torch.cat([r["tokens"], r["drafts"]])[None]).logits[0]
        p = torch.softmax(logits[r["tokens"].numel() - 1:-1], -1)
        alpha_sums[:k] += torch.minimum(p, expected_q).sum(-1).numpy()
    np.testing.assert_allclose(stats["alpha_sum_by_position"], alpha_sums, rtol=1e-4)
    assert stats["verified_by_position"][0] == sum(r["drafts"].numel() > 0 for r in rounds) > 3


def test_eagle3_reference_catches_misaligned_target_states(eagle_pair, monkeypatch):
    target, drafters = eagle_pair
    real = causal_lm.target_features
    monkeypatch.setattr(causal_lm, "target_features",  # each row reads the previous position's states
                        lambda states, layers: torch.roll(real(states, layers), 1, 0))
    rounds = record_rounds(monkeypatch)
    speculative_generate(target, drafters["reduced"], torch.tensor(PROMPTS[1]), k=2, temperature=1.0,
                         max_new_tokens=8, generator=torch.Generator().manual_seed(3))
    r = rounds[1]
    assert not torch.allclose(r["q"], reference_draft_probs(drafters["reduced"], target, r["tokens"], r["drafts"], 1.0),
                              atol=1e-3)


def test_eagle3_refuses_a_target_it_was_not_trained_for(eagle_pair):
    target, drafters = eagle_pair
    other = tiny_llama(0, 300, hidden=48, layers=2)
    with pytest.raises(Eagle3MismatchError, match="target hidden size 48, drafter expects 32; target "
                       "vocabulary 300, drafter expects 256; aux layers \\[1, 2, 3\\] do not exist"):
        speculative_generate(other, drafters["reduced"], torch.tensor([1, 2]), k=2, temperature=0.0,
                             max_new_tokens=2)


@pytest.fixture(scope="module")
def small_vocab_eagle(small_vocab_pair):
    """An EAGLE-3 drafter for the 8-token target, proposing from 6 of its tokens."""
    target, _ = small_vocab_pair
    return tiny_eagle3(2, target, 6, (0, 1, 1))


def test_eagle3_sampling_matches_the_target_distribution(small_vocab_pair, small_vocab_eagle):
    target, _ = small_vocab_pair
    # 4 tokens: the first from the prompt's forward, then K = 2 drafts per step with rollbacks.
    samples = sample_outputs(target, small_vocab_eagle, 800, temperature=1.0, k=2, steps=4)
    assert min(distribution_pvalues(samples, exact_joint(target, 1.0, steps=4))) > 1e-3


def test_eagle3_wrong_residual_fails_the_distribution_test(small_vocab_pair, small_vocab_eagle, monkeypatch):
    target, _ = small_vocab_pair
    monkeypatch.setattr(spec, "residual_distribution", lambda p, q: p)
    samples = sample_outputs(target, small_vocab_eagle, 400, temperature=1.0, k=2, steps=4)
    assert min(distribution_pvalues(samples, exact_joint(target, 1.0, steps=4))) < 1e-6


# --- MEDUSA and the MLP speculator (drafters over the target's final hidden state) ----------------

def tiny_state_drafter(kind: str, seed: int, target, draft_vocab: int | None = None):
    """A random MEDUSA (3 heads) or MLP speculator (4 stages; `mlp-tied`: tied, scaled input) for `target`, over
    `draft_vocab` random target ids (None: the whole vocabulary)."""
    torch.manual_seed(seed)
    hidden, vocab = target.config.hidden_size, target.config.vocab_size
    if kind == "medusa":
        model = MedusaModel(MedusaConfig(hidden_size=hidden, vocab_size=vocab, num_heads=3, num_layers=1,
                                         draft_vocab_size=draft_vocab or vocab))
    else:
        model = MLPSpeculator(MLPSpeculatorConfig(emb_dim=hidden, vocab_size=vocab, inner_dim=24, n_predict=4,
                                                  tie_weights=kind == "mlp-tied", scale_input=kind == "mlp-tied",
                                                  draft_vocab_size=draft_vocab or vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    if draft_vocab:
        model.set_draft_vocab(torch.randperm(vocab)[:draft_vocab].sort().values)
    return model.eval()


@pytest.fixture(scope="module")
def state_pair():
    """A target (vocab 256) and MEDUSA / MLP speculator drafters, one of each over a reduced vocabulary."""
    torch.set_num_threads(1)
    target = tiny_llama(0, 256, init=0.2, tied=False)
    drafters = {"medusa": tiny_state_drafter("medusa", 0, target), "medusa-reduced":
                tiny_state_drafter("medusa", 1, target, draft_vocab=200),
                "mlp": tiny_state_drafter("mlp", 2, target), "mlp-tied": tiny_state_drafter("mlp-tied", 3, target),
                "mlp-reduced": tiny_state_drafter("mlp-tied", 4, target, draft_vocab=200)}
    return target, drafters


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("drafter_name", ["medusa", "medusa-reduced", "mlp", "mlp-tied", "mlp-reduced"])
def test_state_drafters_greedy_output_equals_target_greedy(state_pair, drafter_name, k):
    target, drafters = state_pair
    for prompt in PROMPTS:
        expected = greedy_reference(target, prompt, 24, eos=None)
        output, stats = speculative_generate(target, drafters[drafter_name], torch.tensor(prompt), k=k,
                                             temperature=0.0, max_new_tokens=24)
        assert output.tolist() == expected, (drafter_name, k, prompt)
        assert stats["accepted"] + stats["target_forwards"] == 24
        assert stats["drafted"] > 0
        steps = drafters[drafter_name].num_steps
        assert stats["verified_by_position"][min(k, steps):] == [0] * (k - min(k, steps))  # at most K drafts


def test_a_state_drafter_drafts_from_the_state_of_the_position_that_produced_the_newest_token(state_pair,
                                                                                              monkeypatch):
    target, drafters = state_pair
    drafter = drafters["mlp"]
    rounds = []
    real = spec.draft

    def recording(drafter_, cache, tokens, k, temperature, generator, vocab):
        rounds.append((tokens.clone(), None if cache.state is None else cache.state.clone()))
        return real(drafter_, cache, tokens, k, temperature, generator, vocab)

    monkeypatch.setattr(spec, "draft", recording)
    speculative_generate(target, drafter, torch.tensor(PROMPTS[1]), k=3, temperature=1.0, max_new_tokens=20,
                         generator=torch.Generator().manual_seed(0))
    assert rounds[0][1] is None  # nothing to draft from before the target has read the prompt
    for tokens, state in rounds[1:]:
        with torch.no_grad():  # h_t of the position t = len − 2 that produced the newest committed token
            expected = target(tokens[None], output_hidden_states=True).hidden_states[-1][0, -2]
        torch.testing.assert_close(state[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, draft_vocab", [("medusa", 6), ("mlp", None), ("mlp", 6)])
def test_state_drafters_sampling_matches_the_target_distribution(small_vocab_pair, kind, draft_vocab):
    target, _ = small_vocab_pair
    drafter = tiny_state_drafter(kind, 5, target, draft_vocab=draft_vocab)
    samples = sample_outputs(target, drafter, 800, temperature=1.0, k=2, steps=4)
    assert min(distribution_pvalues(samples, exact_joint(target, 1.0, steps=4))) > 1e-3


@pytest.mark.parametrize("kind", ["medusa", "mlp"])
def test_state_drafters_wrong_residual_fails_the_distribution_test(small_vocab_pair, kind, monkeypatch):
    target, _ = small_vocab_pair
    drafter = tiny_state_drafter(kind, 5, target, draft_vocab=6 if kind == "medusa" else None)
    monkeypatch.setattr(spec, "residual_distribution", lambda p, q: p)
    samples = sample_outputs(target, drafter, 800, temperature=1.0, k=2, steps=4)
    assert min(distribution_pvalues(samples, exact_joint(target, 1.0, steps=4))) < 1e-6


def test_state_drafters_refuse_a_target_they_were_not_trained_for(state_pair):
    _, drafters = state_pair
    other = tiny_llama(0, 300, hidden=48, layers=2)
    for name in ("medusa", "mlp"):
        with pytest.raises(DrafterMismatchError, match="target hidden size 48, drafter expects 32; "
                                                       "target vocabulary 300, drafter expects 256"):
            speculative_generate(other, drafters[name], torch.tensor([1, 2]), k=2, temperature=0.0,
                                 max_new_tokens=2)
