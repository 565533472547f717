"""MEDUSA heads: spec, alignment, training gradients, vLLM's export layout and forward (no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from cache import open_cache
from trainer.data import BatchStream, LoaderSpec, heldout_split, scan_index
from trainer.drafters import (DrafterError, SpecContext, build_drafter, draft_vocabulary, family, family_for,
                              family_of_dir, family_of_model, load_embeddings)
from trainer.drafters.base import ExportFormatError
from trainer.drafters.medusa import MedusaConfig, MedusaModel, is_medusa_dir, load_medusa, save_medusa
from trainer.losses import SparseTarget, combine_steps, compute_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 49152


@pytest.fixture(scope="module")
def cache_batch(tiny_cache):
    """A real cached batch of the tiny target with random `last` features (width 32)."""
    reader = open_cache(tiny_cache)
    split = heldout_split(scan_index(reader), 0.1, 8)
    stream = BatchStream(reader, LoaderSpec(0, 1, 0, 256, split.heldout_threshold), prefetch=1)
    try:
        batch = next(stream)
    finally:
        stream.close()
    batch.features["last"] = torch.randn(*batch.input_ids.shape, 32, generator=torch.Generator().manual_seed(0))
    return batch, split


def context(tiny_cache, tiny_target_dir, split, **overrides) -> SpecContext:
    from transformers import AutoConfig

    reader = open_cache(tiny_cache)
    values = dict(vocab_size=VOCAB, max_positions=2048, features={"last": {"dim": 32}},
                  target_path=str(tiny_target_dir), target_config=AutoConfig.from_pretrained(tiny_target_dir),
                  draft_vocabulary=lambda size: draft_vocabulary(reader, size, split.heldout_threshold))
    return SpecContext(**{**values, **overrides})


@pytest.fixture(scope="module")
def spec(tiny_cache, tiny_target_dir, cache_batch):
    return family("medusa").resolve("medusa:heads=3,layers=2,draft_vocab=300",
                                    context(tiny_cache, tiny_target_dir, cache_batch[1]))


def test_options_defaults_and_refusals(tiny_cache, tiny_target_dir, cache_batch):
    medusa = family_for("medusa:heads=3")
    assert medusa.name == "medusa" and medusa.columns == ("last",) and medusa.default_eta == 10.0
    assert medusa.parse("medusa:heads=3, layers=2,draft_vocab=100") == {"heads": 3, "layers": 2, "draft_vocab": 100}
    with pytest.raises(DrafterError, match="--drafter medusa: bad option 'steps=2'"):
        medusa.parse("medusa:steps=2")
    with pytest.raises(DrafterError, match="--drafter medusa heads must be > 0"):
        medusa.parse("medusa:heads=0")
    full = medusa.resolve("medusa", context(tiny_cache, tiny_target_dir, cache_batch[1]))
    assert full.hf_config == {"hidden_size": 32, "vocab_size": VOCAB, "num_heads": 6, "num_layers": 1,
                              "draft_vocab_size": VOCAB} and full.draft_vocab is None
    with pytest.raises(DrafterError, match="draft_vocab must be in 1..49152"):
        medusa.resolve("medusa:draft_vocab=50000", context(tiny_cache, tiny_target_dir, cache_batch[1]))
    with pytest.raises(DrafterError, match="copies the target's LM head: pass --target MODEL"):
        medusa.resolve("medusa", context(tiny_cache, tiny_target_dir, cache_batch[1], target_path=None))


def test_spec_takes_the_draft_vocabulary_by_cached_mass(spec, tiny_cache, cache_batch):
    expected = draft_vocabulary(open_cache(tiny_cache), 300, cache_batch[1].heldout_threshold)
    assert spec.kind == "medusa" and spec.draft_vocab == expected.ids
    assert spec.settings["draft_vocab_mass"] == expected.mass and spec.hf_config["draft_vocab_size"] == 300


def test_head_n_at_row_t_scores_the_target_row_of_position_t_plus_n_and_starts_as_the_target(spec, cache_batch,
                                                                                              tiny_target_dir):
    batch, _ = cache_batch
    torch.manual_seed(0)
    drafter = build_drafter(spec).eval()
    assert drafter.required_columns == ("last",) and drafter.num_steps == 3
    assert torch.equal(drafter.vocab_map, torch.tensor(spec.draft_vocab))
    lm_head = load_embeddings(tiny_target_dir, output=True)[torch.tensor(spec.draft_vocab)]  # [300, 32]
    with torch.no_grad():
        steps = drafter(batch.model_inputs())
    last = batch.features["last"]
    for n, step in enumerate(steps, start=1):
        rows = torch.nonzero(batch.target_pos >= n).view(-1)
        assert torch.equal(step.rows, rows)
        hidden = last[batch.target_batch[rows], batch.target_pos[rows] - n]  # h_t, t = p − n
        # Zero-initialized blocks: every head is the target's LM head (over the draft vocabulary) at init.
        torch.testing.assert_close(step.logits, hidden @ lm_head.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["kl", "lk_lambda"])
def test_every_head_learns(spec, cache_batch, loss):
    batch, _ = cache_batch
    torch.manual_seed(0)
    drafter = build_drafter(spec)
    steps = drafter(batch.model_inputs())
    target = SparseTarget(batch.topk_ids, batch.topk_logprobs)
    results = [compute_loss(loss, s.logits, SparseTarget(target.ids[s.rows], target.logprobs[s.rows]), eta=10.0,
                            vocab_map=drafter.vocab_map) for s in steps]
    total = combine_steps(results)
    assert torch.isfinite(total) and all(0.0 <= float(r.alpha_mean) <= 1.0 for r in results)
    total.backward()
    for name, p in drafter.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


# --- export -----------------------------------------------------------------------------------

def random_medusa(draft_vocab: int, seed: int = 0, vocab: int = 300, hidden: int = 24) -> MedusaModel:
    torch.manual_seed(seed)
    model = MedusaModel(MedusaConfig(hidden_size=hidden, vocab_size=vocab, num_heads=3, num_layers=2,
                                     draft_vocab_size=draft_vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # not the zero init: a swapped or transposed tensor would show
    if draft_vocab < vocab:
        model.set_draft_vocab(torch.randperm(vocab)[:draft_vocab].sort().values)
    return model.eval()


def read_tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize("draft_vocab", [40, 300])
def test_export_has_vllms_medusa_keys_and_shapes(tmp_path, draft_vocab):
    model = random_medusa(draft_vocab)
    save_medusa(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "model_type", "hidden_size", "vocab_size", "num_heads",
                                   "num_hidden_layers", "truncated_vocab_size", "medusa_fc_bias")} == {
        "architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": 24, "vocab_size": 300,
        "num_heads": 3, "num_hidden_layers": 2, "truncated_vocab_size": draft_vocab, "medusa_fc_bias": True}
    spec = {f"blocks.{h}.layers.{l}.weight": ((24, 24), torch.float32) for h in range(3) for l in range(2)}
    spec.update({f"blocks.{h}.layers.{l}.bias": ((24,), torch.float32) for h in range(3) for l in range(2)})
    spec.update({f"lm_heads.{h}.weight": ((draft_vocab, 24), torch.float32) for h in range(3)})
    if draft_vocab < 300:
        spec["token_map"] = ((draft_vocab,), torch.int64)
    tensors = read_tensors(tmp_path / "m")
    assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == spec
    if draft_vocab < 300:
        assert torch.equal(tensors["token_map"], model.draft_ids)
    assert is_medusa_dir(tmp_path / "m") and family_of_dir(tmp_path / "m").name == "medusa"


def vllm_medusa_logits(directory, hidden: torch.Tensor) -> list[torch.Tensor]:
    """vLLM's Medusa forward + compute_logits from config.json and the safetensors alone (plain torch)."""
    config = json.loads((directory / "config.json").read_text())
    tensors = read_tensors(directory)
    out = []
    for h in range(config["num_heads"]):
        x = hidden
        for layer in range(config["num_hidden_layers"]):  # ResidualBlock: x = x + SiLU(Linear(x))
            x = x + F.silu(F.linear(x, tensors[f"blocks.{h}.layers.{layer}.weight"],
                                    tensors.get(f"blocks.{h}.layers.{layer}.bias")))
        logits = F.linear(x, tensors[f"lm_heads.{h}.weight"])
        if config["truncated_vocab_size"] < config["vocab_size"]:  # -inf outside token_map
            full = torch.full((*logits.shape[:-1], config["vocab_size"]), float("-inf"))
            full[..., tensors["token_map"]] = logits
            logits = full
        out.append(logits)
    return out


def decoder_logits(model, hidden: torch.Tensor, last_token: int, vocab: int) -> list[torch.Tensor]:
    """The logits our decoder's family hooks hand to the proposal rule, one per draft step (greedy proposals)."""
    kind = family_of_model(model)
    cache = kind.new_cache(model)
    kind.commit(cache, hidden)
    seen = []

    def propose(logits):
        seen.append(logits.clone())
        return logits.argmax(-1), torch.softmax(logits, -1)

    kind.draft(model, cache, torch.tensor([5, last_token]), 6, propose, vocab)
    return seen


@pytest.mark.parametrize("draft_vocab", [40, 300])
def test_vllms_forward_on_the_export_gives_the_decoders_draft_logits(tmp_path, draft_vocab):
    model = random_medusa(draft_vocab, seed=1)
    save_medusa(model, tmp_path / "m")
    hidden = torch.randn(1, 24, generator=torch.Generator().manual_seed(2))
    theirs = vllm_medusa_logits(tmp_path / "m", hidden)
    ours = decoder_logits(model, hidden, 7, 300)
    assert len(ours) == len(theirs) == 3  # k = 6 asked, 3 heads
    for a, b in zip(ours, theirs):
        assert torch.equal(torch.isinf(a), torch.isinf(b)) and int(torch.isfinite(a).sum()) == draft_vocab
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-5, rtol=1e-5)


def test_round_trip_and_a_broken_export_is_refused(tmp_path):
    model = random_medusa(40)
    save_medusa(model, tmp_path / "m")
    loaded = load_medusa(tmp_path / "m")
    assert torch.equal(loaded.draft_ids, model.draft_ids) and loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    from safetensors.torch import save_file

    tensors = read_tensors(tmp_path / "m")
    tensors["lm_heads.1.weight"] = tensors["lm_heads.1.weight"][:, :5].contiguous()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ExportFormatError, match=r"lm_heads.1.weight has shape \(40, 5\), config.json implies "
                                                r"\(40, 24\)"):
        load_medusa(tmp_path / "m")


def test_the_cached_last_feature_is_the_hidden_state_the_decoder_reads(tiny_target_dir):
    """The cache's `last` column (pipeline.target_pass) equals hidden_states[-1] of the decoder's target forward."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from pipeline.target_pass import Sample, target_topk
    from trainer.drafters.causal_lm import forward
    from trainer.drafters.last_state import LAST

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    ids = np.array([1000, 1200, 1300, 1005, 1111, 1234, 1042], dtype=np.int32)
    [(_, _, features)] = target_topk(target, [Sample("s", ids, np.ones(7, dtype=bool))], 4, features=("last",))
    with torch.no_grad():
        _, states = forward(target, torch.from_numpy(ids.astype(np.int64)), DynamicCache(config=target.config), 1,
                            (LAST,))
    assert states.shape == (7, 32)
    assert torch.equal(torch.from_numpy(features["last"]), states)
