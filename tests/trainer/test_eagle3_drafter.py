"""The EAGLE-3 drafter: TTT unroll vs the inference chain, draft vocabulary, embeddings, options (no Ray)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from cache import open_cache
from trainer.data import BatchStream, LoaderSpec, heldout_split, is_heldout, scan_index
from trainer.drafters import DrafterError, build_drafter, draft_vocabulary
from trainer.drafters.eagle3.model import Eagle3Config, Eagle3Model
from trainer.drafters.eagle3.train import (DEFAULT_STEPS, Eagle3Drafter, default_draft_vocab, draft_vocab_size,
                                           parse_eagle3, resolve_eagle3_spec)
from trainer.losses import SparseTarget, combine_steps, compute_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = Eagle3Config(vocab_size=300, draft_vocab_size=40, hidden_size=32, target_hidden_size=24,
                      intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, aux_layers=(1, 2, 3))


def _model(seed: int = 0) -> Eagle3Model:
    torch.manual_seed(seed)
    model = Eagle3Model(CONFIG)
    model.set_draft_vocab(torch.randperm(CONFIG.vocab_size)[:CONFIG.draft_vocab_size].sort().values)
    return model.eval()


def _batch(lengths=(11, 7), seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ids, random target features, and a target row for every predicting position p <= len − 2."""
    generator = torch.Generator().manual_seed(seed)
    size, longest = len(lengths), max(lengths)
    input_ids = torch.zeros(size, longest, dtype=torch.long)
    mask = torch.zeros(size, longest, dtype=torch.long)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = torch.randint(1, CONFIG.vocab_size, (n,), generator=generator)
        mask[b, :n] = 1
    rows = [(b, p) for b, n in enumerate(lengths) for p in range(n - 1)]
    return {"input_ids": input_ids, "attention_mask": mask,
            "target_batch": torch.tensor([b for b, _ in rows]), "target_pos": torch.tensor([p for _, p in rows]),
            "aux": torch.randn(size, longest, 3 * CONFIG.target_hidden_size, generator=generator)}


def _inference_chain(model: Eagle3Model, ids: torch.Tensor, aux: torch.Tensor, t: int, steps: int) -> list:
    """Draft logits of row t's chain, computed as the decoder does: a KV cache of step-1 rows, then own keys."""
    keys, values = [], []
    for row in range(t + 1):  # committed rows, appended one at a time
        prefix = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else None
        logits, out, k, v = model.step(ids[None, row + 1:row + 2], model.fuse(aux[None, row:row + 1]),
                                       torch.tensor([[row]]), prefix, torch.ones(1, row + 1, dtype=torch.bool))
        keys.append(k)
        values.append(v)
    chain = [logits[0, 0]]
    for m in range(2, steps + 1):  # draft step m of row t: token x_{t+m}, own hidden, position t+m−1
        visible = len(keys) + 1
        logits, out, k, v = model.step(ids[None, t + m:t + m + 1], out, torch.tensor([[t + m - 1]]),
                                       (torch.cat(keys, 2), torch.cat(values, 2)),
                                       torch.ones(1, visible, dtype=torch.bool))
        keys.append(k)
        values.append(v)
        chain.append(logits[0, 0])
    return chain


def test_ttt_unroll_equals_the_inference_chain_with_padding():
    model = _model()
    batch = _batch()
    drafter = Eagle3Drafter(model, steps=4)
    with torch.no_grad():
        steps = drafter(batch)
    assert len(steps) == 4
    target_b, target_p = batch["target_batch"], batch["target_pos"]
    checked = 0
    with torch.no_grad():
        for n, step in enumerate(steps, start=1):
            assert torch.equal(step.rows, torch.nonzero(target_p >= n).view(-1))
            assert step.logits.shape == (len(step.rows), CONFIG.draft_vocab_size)
            for i, row in enumerate(step.rows.tolist()):
                b, p = int(target_b[row]), int(target_p[row])
                length = int(batch["attention_mask"][b].sum())
                ids, aux = batch["input_ids"][b, :length], batch["aux"][b, :length]
                expected = _inference_chain(model, ids, aux, t=p - n, steps=n)[-1]
                torch.testing.assert_close(step.logits[i], expected, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == sum(max(0, n - 1 - s) for n in (11, 7) for s in range(1, 5))


def test_a_sequence_scores_the_same_alone_and_padded_in_a_batch():
    model = _model()
    drafter = Eagle3Drafter(model, steps=3)
    batch = _batch(lengths=(12, 5))
    alone = {key: value[1:2, :5] if value.dim() > 1 else value for key, value in batch.items()}
    keep = batch["target_batch"] == 1
    alone["target_batch"] = torch.zeros(int(keep.sum()), dtype=torch.long)
    alone["target_pos"] = batch["target_pos"][keep]
    with torch.no_grad():
        padded, single = drafter(batch), drafter(alone)
    offset = int((~keep).sum())
    for n, (a, b) in enumerate(zip(padded, single), start=1):
        mine = torch.isin(a.rows, torch.nonzero(keep).view(-1))
        assert torch.equal(a.rows[mine] - offset, b.rows)
        torch.testing.assert_close(a.logits[mine], b.logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cache_batch(tiny_cache):
    """A real cached batch (k=16 targets of the tiny target) with random aux features added."""
    reader = open_cache(tiny_cache)
    split = heldout_split(scan_index(reader), 0.1, 8)
    stream = BatchStream(reader, LoaderSpec(0, 1, 0, 256, split.heldout_threshold), prefetch=1)
    try:
        batch = next(stream)
    finally:
        stream.close()
    generator = torch.Generator().manual_seed(0)
    batch.features["aux"] = torch.randn(*batch.input_ids.shape, 96, generator=generator)
    return batch, split


@pytest.fixture(scope="module")
def eagle3_spec(tiny_cache, tiny_target_dir, cache_batch):
    from transformers import AutoConfig

    _, split = cache_batch
    vocab = draft_vocabulary(open_cache(tiny_cache), 512, split.heldout_threshold)
    return resolve_eagle3_spec("eagle3:steps=3", vocab_size=49152,
                               target_config=AutoConfig.from_pretrained(tiny_target_dir),
                               target_path=str(tiny_target_dir), aux={"dim": 96, "layers": [1, 1, 1]},
                               draft_ids=vocab.ids, max_positions=2048, draft_vocab_mass=vocab.mass)


def test_draft_vocabulary_holds_the_most_target_mass_of_the_training_positions(tiny_cache, cache_batch):
    _, split = cache_batch
    reader = open_cache(tiny_cache)
    mass, positions = defaultdict(float), 0
    for record in reader.iter_sequences():
        if record.num_positions and not is_heldout(record.sample_id, split.heldout_threshold):
            positions += record.num_positions
            for ids, logprobs in zip(record.topk_ids, record.topk_logprobs):
                for token, logprob in zip(ids.tolist(), logprobs.tolist()):
                    mass[token] += float(np.exp(logprob))
    ranked = sorted(mass, key=lambda token: (-mass[token], token))
    vocab = draft_vocabulary(reader, 100, split.heldout_threshold)
    assert vocab.ids == sorted(ranked[:100]) and vocab.positions == positions
    assert vocab.mass == pytest.approx(sum(mass[t] for t in ranked[:100]) / positions, rel=1e-9)
    assert 0.0 < vocab.mass < draft_vocabulary(reader, 400, split.heldout_threshold).mass <= 1.0 + 1e-6
    # More ids than the cache ever saw: the rest are the lowest unseen ids.
    full = draft_vocabulary(reader, len(mass) + 5, split.heldout_threshold)
    assert set(mass) < set(full.ids) and len(full.ids) == len(mass) + 5


def test_spec_follows_the_target_and_embeddings_are_copied_and_frozen(eagle3_spec, tiny_target_dir):
    from trainer.drafters import load_input_embeddings

    config = eagle3_spec.hf_config
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["target_hidden_size"]) == (32, 4, 2, 64, 32)
    assert eagle3_spec.kind == "eagle3" and eagle3_spec.settings["steps"] == 3 and len(eagle3_spec.draft_vocab) == 512
    drafter = build_drafter(eagle3_spec)
    assert isinstance(drafter, Eagle3Drafter) and drafter.required_columns == ("aux",) and drafter.num_steps == 3
    assert torch.equal(drafter.vocab_map, torch.tensor(eagle3_spec.draft_vocab))
    assert torch.equal(drafter.model.embed_tokens.weight, load_input_embeddings(tiny_target_dir))
    assert not drafter.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("loss", ["kl", "lk_lambda"])
def test_loss_at_init_is_finite_and_trains_all_but_the_frozen_embeddings(eagle3_spec, cache_batch, loss):
    batch, _ = cache_batch
    torch.manual_seed(0)
    drafter = build_drafter(eagle3_spec)
    steps = drafter(batch.model_inputs())
    target = SparseTarget(batch.topk_ids, batch.topk_logprobs)
    results = [compute_loss(loss, s.logits, SparseTarget(target.ids[s.rows], target.logprobs[s.rows]),
                            vocab_map=drafter.vocab_map) for s in steps]
    total = combine_steps(results)
    assert torch.isfinite(total) and all(0.0 <= float(r.alpha_mean) <= 1.0 for r in results)
    assert [len(s.rows) for s in steps] == [int((batch.target_pos >= n).sum()) for n in (1, 2, 3)]
    total.backward()
    grads = {name: p.grad for name, p in drafter.named_parameters()}
    assert grads["model.embed_tokens.weight"] is None
    for name in ("model.fc.weight", "model.midlayer.self_attn.q_proj.weight", "model.midlayer.mlp.down_proj.weight",
                 "model.midlayer.hidden_norm.weight", "model.norm.weight", "model.lm_head.weight"):
        assert grads[name] is not None and float(grads[name].abs().sum()) > 0, name


def test_later_steps_learn_from_their_own_hidden_states(eagle3_spec, cache_batch):
    """Step 2's loss has a gradient through step 1's output: the unroll is differentiable end to end."""
    batch, _ = cache_batch
    torch.manual_seed(0)
    drafter = build_drafter(eagle3_spec)
    steps = drafter(batch.model_inputs())
    target = SparseTarget(batch.topk_ids[steps[1].rows], batch.topk_logprobs[steps[1].rows])
    compute_loss("kl", steps[1].logits, target, vocab_map=drafter.vocab_map).loss.backward()
    assert float(drafter.model.fc.weight.grad.abs().sum()) > 0


def test_options_parse_and_refuse_by_name():
    assert parse_eagle3("eagle3") == {}
    assert parse_eagle3("eagle3:hidden=64, draft_vocab=1024,steps=2,freeze_embeddings=false") == {
        "hidden": 64, "draft_vocab": 1024, "steps": 2, "freeze_embeddings": False}
    assert draft_vocab_size("eagle3", 49152) == 8192 == default_draft_vocab(49152)
    assert draft_vocab_size("eagle3:draft_vocab=100", 49152) == 100
    assert default_draft_vocab(128256) == 32000 and default_draft_vocab(500) == 500 and DEFAULT_STEPS == 6
    with pytest.raises(DrafterError, match="bad option 'layers=2'"):
        parse_eagle3("eagle3:layers=2")
    with pytest.raises(DrafterError, match="--drafter eagle3 steps must be > 0"):
        parse_eagle3("eagle3:steps=0")


def test_spec_refusals_name_the_problem(tiny_target_dir):
    from transformers import AutoConfig

    from cache import CacheMismatchError

    target = AutoConfig.from_pretrained(tiny_target_dir)
    common = dict(vocab_size=49152, target_config=target, target_path=str(tiny_target_dir), draft_ids=[1, 2, 3],
                  max_positions=64, draft_vocab_mass=0.5)
    with pytest.raises(CacheMismatchError, match="aux feature has dimension 90"):
        resolve_eagle3_spec("eagle3", aux={"dim": 90, "layers": [1, 1, 1]}, **common)
    with pytest.raises(DrafterError, match="freeze_embeddings=true needs the target's embeddings"):
        resolve_eagle3_spec("eagle3:hidden=64,freeze_embeddings=true", aux={"dim": 96}, **common)
    wider = resolve_eagle3_spec("eagle3:hidden=64", aux={"dim": 96}, **common)
    assert wider.init_embeddings_path is None and wider.settings["freeze_embeddings"] is False
    assert wider.hf_config["num_attention_heads"] == 1 and wider.hf_config["intermediate_size"] == 192
