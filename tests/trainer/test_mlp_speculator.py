"""The MLP speculator: spec, teacher-forced stages vs the decoding chain, a reduced draft vocabulary, vLLM's export
layout and forward (no Ray)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from cache import open_cache
from trainer.data import BatchStream, LoaderSpec, heldout_split, scan_index
from trainer.drafters import DrafterError, SpecContext, build_drafter, draft_vocabulary, family, family_for, \
    family_of_dir, family_of_model
from trainer.drafters.base import DraftStep, ExportFormatError, shifted_tokens, step_rows
from trainer.drafters.mlp import (MLPSpeculator, MLPSpeculatorConfig, is_mlp_speculator_dir, load_mlp_speculator,
                                  save_mlp_speculator)
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
    batch.heldout_threshold = split.heldout_threshold
    return batch


def resolve(drafter: str, reader=None, heldout_threshold: int = 0, **context):
    """The spec of `drafter` for a width-32 `last` column (draft vocabularies from `reader`'s cached mass)."""
    vocabulary = None if reader is None else (lambda size: draft_vocabulary(reader, size, heldout_threshold))
    return family("mlp").resolve(drafter, SpecContext(vocab_size=VOCAB, max_positions=2048, features={"last": {
        "dim": 32}}, draft_vocabulary=vocabulary, **context))


def test_options_defaults_and_refusals():
    mlp = family_for("mlp:stages=4")
    assert mlp.name == "mlp" and mlp.columns == ("last",) and mlp.default_eta == 3.0
    assert mlp.parse("mlp:stages=4,inner=64,tie=true,scale_input=1,draft_vocab=100") == {
        "stages": 4, "inner": 64, "tie": True, "scale_input": True, "draft_vocab": 100}
    with pytest.raises(DrafterError, match="--drafter mlp: bad option 'heads=2'"):
        mlp.parse("mlp:heads=2")
    with pytest.raises(DrafterError, match="--drafter mlp tie must be true or false"):
        mlp.parse("mlp:tie=maybe")
    full = resolve("mlp")
    assert full.hf_config == {"emb_dim": 32, "vocab_size": VOCAB, "inner_dim": 32, "n_predict": 6,
                              "tie_weights": False, "scale_input": False, "draft_vocab_size": VOCAB}
    assert full.draft_vocab is None and resolve(f"mlp:draft_vocab={VOCAB}").draft_vocab is None
    with pytest.raises(DrafterError, match="tie_weights needs at least 2 stages"):
        resolve("mlp:stages=1,tie=true")
    with pytest.raises(DrafterError, match="--drafter mlp: draft_vocab must be in 1..49152"):
        resolve("mlp:draft_vocab=50000")


def test_the_flags_it_cannot_honour_are_said_not_dropped(tiny_cache, capsys):
    assert not family("mlp").init_embeddings and family("medusa").init_embeddings
    capsys.readouterr()
    resolve("mlp:stages=2", init_embeddings=("target-dir", 32))
    assert capsys.readouterr().err == ("lkspec: warning: --init-embeddings-from target does not apply to MLP "
                                       "speculators (their embeddings and heads start at random, IBM's "
                                       "initialization); ignored\n")
    resolve("mlp:stages=2,draft_vocab=64", open_cache(tiny_cache))
    assert capsys.readouterr().err == (
        "lkspec: warning: --drafter mlp:stages=2,draft_vocab=64: every run's model/ will be in lkspec's own layout, "
        "which vLLM does not load: vLLM's MLPSpeculator has no token map (its heads span the whole vocabulary); "
        "train without draft_vocab to export for vLLM\n")


def stage_reference(model: MLPSpeculator, h: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    """vLLM's generate_proposals maths for one row, written out: state_n and head_n's logits."""
    sw = 0.5 ** (0.5 / model.config.n_predict)
    ew = math.sqrt((1 - sw ** 2) * (model.config.inner_dim / 2))
    state = h
    if model.config.scale_input:
        state = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6) / 2 ** 0.5
    out = []
    for n, token in enumerate(tokens):
        mixed = state @ model.proj[n].weight.T + ew / sw * model.emb[n].weight[token]
        normed = mixed * torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + 1e-6)
        state = F.gelu(model.ln[n].weight * normed + model.ln[n].bias)
        out.append(state @ model.head[n].weight.T)
    return out


@pytest.mark.parametrize("options", ["mlp:stages=3,inner=48", "mlp:stages=3,tie=true,scale_input=true"])
def test_stage_n_at_row_t_reads_tokens_t_plus_1_to_t_plus_n_and_scores_the_row_of_position_t_plus_n(
        cache_batch, options):
    batch = cache_batch
    torch.manual_seed(0)
    drafter = build_drafter(resolve(options)).eval()
    with torch.no_grad():
        for p in drafter.parameters():  # norms away from 1 / 0: a missing scale or shift would show
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        steps = drafter(batch.model_inputs())
    assert drafter.num_steps == 3 and drafter.vocab_map is None
    ids, last = batch.input_ids, batch.features["last"]
    for n, step in enumerate(steps, start=1):
        assert torch.equal(step.rows, torch.nonzero(batch.target_pos >= n).view(-1))
    for n, step in enumerate(steps, start=1):  # a few rows of each step, checked against the reference chain
        for i in (0, 7, len(step.rows) - 1):
            b, p = int(batch.target_batch[step.rows[i]]), int(batch.target_pos[step.rows[i]])
            t = p - n
            with torch.no_grad():
                reference = stage_reference(drafter.model, last[b, t], [int(ids[b, t + m]) for m in range(1, n + 1)])
            torch.testing.assert_close(step.logits[i], reference[-1], atol=1e-4, rtol=1e-4)


def test_every_stage_learns(cache_batch):
    batch = cache_batch
    torch.manual_seed(0)
    drafter = build_drafter(resolve("mlp:stages=3,inner=48"))
    target = SparseTarget(batch.topk_ids, batch.topk_logprobs)
    results = [compute_loss("lk_lambda", s.logits, SparseTarget(target.ids[s.rows], target.logprobs[s.rows]))
               for s in drafter(batch.model_inputs())]
    combine_steps(results).backward()
    for name, p in drafter.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_tied_stages_embed_all_tokens_in_one_lookup_with_the_per_stage_gradients(cache_batch):
    """Training looks the shared table up once for every stage (one dense gradient, not K); the loss and every
    gradient equal those of K per-stage lookups through embed(), the decoder's path."""
    batch = cache_batch
    torch.manual_seed(0)
    drafter = build_drafter(resolve("mlp:stages=3,tie=true"))
    model, inputs = drafter.model, batch.model_inputs()
    target = SparseTarget(batch.topk_ids, batch.topk_logprobs)

    def loss_and_grads(steps):
        loss = combine_steps([compute_loss("lk_lambda", s.logits, SparseTarget(target.ids[s.rows],
                                                                               target.logprobs[s.rows]))
                              for s in steps])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss, grads

    def per_stage_steps():
        state, steps = model.start(inputs["last"]), []
        for n in range(1, 4):
            state = model.advance(n - 1, state, model.embed(n - 1, shifted_tokens(inputs["input_ids"], n)))
            rows, row_batch, row_pos = step_rows(inputs["target_batch"], inputs["target_pos"], n)
            steps.append(DraftStep(model.logits(n - 1, state[row_batch, row_pos]), rows))
        return steps

    tokens = torch.stack([shifted_tokens(inputs["input_ids"], n) for n in range(1, 4)])
    lookups = []
    hook = model.emb[0].register_forward_hook(lambda module, args, out: lookups.append(args[0].shape))
    one_lookup = loss_and_grads(drafter(inputs))
    hook.remove()
    assert lookups == [tokens.shape]  # all three stages' tokens in one call
    reference = loss_and_grads(per_stage_steps())
    torch.testing.assert_close(one_lookup[0], reference[0], rtol=1e-6, atol=1e-6)
    for (name, _), grad, expected in zip(model.named_parameters(), one_lookup[1], reference[1]):
        assert float(expected.abs().sum()) > 0, name
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reduced_spec(tiny_cache, cache_batch):
    """A tied 3-stage speculator over the 300 ids with the most cached target mass."""
    return resolve("mlp:stages=3,inner=48,tie=true,draft_vocab=300", open_cache(tiny_cache),
                   cache_batch.heldout_threshold)


def test_a_reduced_draft_vocabulary_trains_with_n_head_rows_and_target_id_embeddings(reduced_spec, tiny_cache,
                                                                                       cache_batch):
    expected = draft_vocabulary(open_cache(tiny_cache), 300, cache_batch.heldout_threshold)
    assert reduced_spec.draft_vocab == expected.ids and reduced_spec.settings["draft_vocab_mass"] == expected.mass
    assert reduced_spec.hf_config["draft_vocab_size"] == 300
    torch.manual_seed(0)
    drafter = build_drafter(reduced_spec)
    model = drafter.model
    assert torch.equal(drafter.vocab_map, torch.tensor(expected.ids))
    assert model.head[0].weight.shape == (300, 48) and model.head[2] is model.head[0]  # tied: one head, N rows
    assert model.emb[0].weight.shape == (VOCAB, 48)  # teacher-forced tokens are target ids
    batch = cache_batch
    target = SparseTarget(batch.topk_ids, batch.topk_logprobs)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        steps = drafter(batch.model_inputs())
        assert all(s.logits.shape == (len(s.rows), 300) for s in steps)
        results = [compute_loss("lk_lambda", s.logits, SparseTarget(target.ids[s.rows], target.logprobs[s.rows]),
                                vocab_map=drafter.vocab_map) for s in steps]
        loss = combine_steps(results)
        assert torch.isfinite(loss) and all(0.0 <= float(r.alpha_mean) <= 1.0 for r in results)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in drafter.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[1] < losses[0]


def test_a_reduced_vocabulary_has_no_vllm_export_and_its_run_directory_loads(reduced_spec, tiny_target_dir,
                                                                            tmp_path):
    from transformers import AutoModelForCausalLM

    from eval import load_drafter

    torch.manual_seed(0)
    drafter = build_drafter(reduced_spec).eval()
    with pytest.raises(ExportFormatError, match=r"^an MLP speculator with draft_vocab=300 has no vLLM layout: vLLM's "
                                                r"MLPSpeculator has no token map .*; train without draft_vocab to "
                                                r"export for vLLM$"):
        save_mlp_speculator(drafter.model, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"drafter": {"kind": "mlp"}}))
    drafter.export(run / "model")  # what the trainer writes to <run>/model
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architectures"] == ["LkspecMLPSpeculator"] and config["truncated_vocab_size"] == 300
    assert torch.equal(read_tensors(run / "model")["token_map"], torch.tensor(reduced_spec.draft_vocab))
    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    loaded = load_drafter(run, target)
    assert family_of_model(loaded).name == "mlp" and loaded.config == drafter.model.config
    assert torch.equal(loaded.draft_ids, drafter.model.draft_ids)
    assert loaded.head[2] is loaded.head[0]  # still tied
    for (name, a), (_, b) in zip(drafter.model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    assert drafter.reload(run / "model", torch.float32).vocab_map.tolist() == reduced_spec.draft_vocab

    # Decoding: each stage proposes a target id (draft id mapped through draft_ids), which the next stage embeds.
    kind, hidden, proposed = family_of_model(loaded), torch.randn(1, 32), []
    cache = kind.new_cache(loaded)
    kind.commit(cache, hidden)

    def propose(logits):
        proposed.append(logits.clone())
        return logits.argmax(-1), torch.softmax(logits, -1)

    with torch.no_grad():
        drafts, _ = kind.draft(loaded, cache, torch.tensor([5, 1017]), 3, propose, VOCAB)
        reference = stage_reference(loaded, hidden[0], [1017, *drafts[:2].tolist()])
    assert torch.isin(drafts, loaded.draft_ids).all()
    for ours, theirs in zip(proposed, reference, strict=True):
        assert torch.equal(torch.isfinite(ours[0]).nonzero().view(-1), loaded.draft_ids)
        torch.testing.assert_close(ours[0, loaded.draft_ids], theirs, atol=1e-5, rtol=1e-5)


# --- export -----------------------------------------------------------------------------------

def random_mlp(tie: bool, scale_input: bool, seed: int = 0) -> MLPSpeculator:
    torch.manual_seed(seed)
    model = MLPSpeculator(MLPSpeculatorConfig(emb_dim=24, vocab_size=300, inner_dim=40, n_predict=3,
                                              tie_weights=tie, scale_input=scale_input))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def read_tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize("tie", [False, True])
def test_export_has_vllms_mlp_speculator_keys_and_shapes(tmp_path, tie):
    save_mlp_speculator(random_mlp(tie, False), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "model_type", "vocab_size", "emb_dim", "inner_dim", "n_predict",
                                   "tie_weights", "scale_input", "top_k_tokens_per_head")} == {
        "architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator", "vocab_size": 300,
        "emb_dim": 24, "inner_dim": 40, "n_predict": 3, "tie_weights": tie, "scale_input": False,
        "top_k_tokens_per_head": [1, 1, 1]}  # vLLM's config asserts len(top_k_tokens_per_head) == n_predict
    stages = [0] if tie else [0, 1, 2]
    spec = {f"emb.{i}.weight": (300, 40) for i in stages}
    spec.update({f"head.{i}.weight": (300, 40) for i in stages})
    spec.update({f"ln.{i}.{p}": (40,) for i in stages for p in ("weight", "bias")})
    spec.update({f"proj.{i}.weight": (40, 24) if i == 0 else (40, 40) for i in ([0, 1] if tie else stages)})
    tensors = read_tensors(tmp_path / "m")
    assert {name: tuple(t.shape) for name, t in tensors.items()} == spec
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert is_mlp_speculator_dir(tmp_path / "m") and family_of_dir(tmp_path / "m").name == "mlp"


def vllm_mlp_proposals(directory, hidden: torch.Tensor, last_token: int) -> list[torch.Tensor]:
    """vLLM's MLPSpeculator.generate_proposals (greedy) from config.json and the safetensors alone (plain torch)."""
    config = json.loads((directory / "config.json").read_text())
    tensors = read_tensors(directory)
    n_predict, inner = config["n_predict"], config["inner_dim"] or config["emb_dim"]

    def stage(name: str, i: int) -> torch.Tensor:  # tied stages share stage 0's tensors (proj: 1's after 0)
        if config["tie_weights"]:
            i = min(i, 1) if name == "proj" else 0
        return tensors[f"{name}.{i}.weight"] if name != "ln" else (tensors[f"ln.{i}.weight"], tensors[f"ln.{i}.bias"])

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    state_weight = 0.5 ** (0.5 / n_predict)
    emb_weight = math.sqrt((1 - state_weight ** 2) * (inner / 2))
    states = hidden[:, None]  # b x 1 x d
    if config["scale_input"]:
        states = norm(states) / 2 ** 0.5
    tokens = torch.tensor([[last_token]])
    out = []
    for i in range(n_predict):
        z = F.embedding(tokens, stage("emb", i))
        states = F.linear(states, stage("proj", i))
        states = states + z * (emb_weight / state_weight)
        weight, bias = stage("ln", i)
        states = F.gelu(weight * norm(states) + bias)
        logits = F.linear(states.flatten(0, 1), stage("head", i))
        out.append(logits)
        tokens = logits.argmax(-1)[:, None]
    return out


@pytest.mark.parametrize("tie, scale_input", [(False, False), (True, True)])
def test_vllms_forward_on_the_export_gives_the_decoders_draft_logits(tmp_path, tie, scale_input):
    model = random_mlp(tie, scale_input, seed=1)
    save_mlp_speculator(model, tmp_path / "m")
    hidden = torch.randn(1, 24, generator=torch.Generator().manual_seed(2))
    theirs = vllm_mlp_proposals(tmp_path / "m", hidden, 7)
    kind = family_of_model(model)
    cache = kind.new_cache(model)
    kind.commit(cache, hidden)
    ours = []

    def propose(logits):  # greedy, as vLLM's proposals: later stages read the tokens drafted before them
        ours.append(logits.clone())
        return logits.argmax(-1), torch.softmax(logits, -1)

    with torch.no_grad():
        drafts, _ = kind.draft(model, cache, torch.tensor([3, 7]), 5, propose, 300)
    assert drafts.numel() == len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_round_trip_and_a_broken_export_is_refused(tmp_path):
    model = random_mlp(True, True)
    save_mlp_speculator(model, tmp_path / "m")
    loaded = load_mlp_speculator(tmp_path / "m")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name
    assert loaded.emb[2] is loaded.emb[0] and loaded.proj[2] is loaded.proj[1]  # still tied after loading
    from safetensors.torch import save_file

    tensors = read_tensors(tmp_path / "m")
    del tensors["ln.0.bias"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ExportFormatError, match=r"missing tensors \['ln.0.bias'\]"):
        load_mlp_speculator(tmp_path / "m")
