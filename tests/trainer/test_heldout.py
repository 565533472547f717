"""Held-out acceptance: expected τ, evaluate()'s per-sequence sums under both tail modes and exact, heldout.json."""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from cache import open_cache
from trainer.data import LoaderSpec, collate, eval_batches, heldout_split, scan_index
from trainer.drafters import Drafter, DraftStep, build_drafter, resolve_drafter_spec
from trainer.heldout import (EXACT, HELDOUT_JSON, QUANTITIES, HeldoutFileError, HeldoutSums, read_heldout,
                             write_heldout)
from trainer.loop import TargetSource, _dummy_batch, evaluate
from trainer.losses import SparseTarget, expected_tau, kl_alpha

SMALL = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 2, "intermediate": 64}


# ------------------------------------------------------------------------------ expected τ
def test_expected_tau_is_one_function_for_chains_stacks_and_draft_lengths():
    assert expected_tau([0.8, 0.5, 0.25]) == pytest.approx(1 + 0.8 + 0.4 + 0.1)
    assert expected_tau(torch.tensor([0.5, 0.5])) == pytest.approx(1.75) and expected_tau([]) == 1.0
    assert expected_tau([0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)  # the last α repeats up to K
    assert expected_tau([0.9, 0.5], 3) == pytest.approx(1 + 0.9 + 0.45 + 0.225)
    assert expected_tau([0.9, 0.5, 0.4], 2) == pytest.approx(1 + 0.9 + 0.45)  # cut to K
    assert expected_tau([1.0], 7) == 8.0 and math.isclose(expected_tau([0.0], 7), 1.0) and expected_tau([], 7) == 1.0
    stack = expected_tau(np.array([[0.5, 0.5], [1.0, 0.0]]))  # [2 chains, 2 steps]
    np.testing.assert_allclose(stack, [1.75, 2.0])


# ------------------------------------------------------------------------------ evaluate()
class TwoSteps(Drafter):
    """Step 1: the independent drafter; step 2: its halved logits at the targets of even positions (rows given)."""

    num_steps = 2

    def __init__(self, inner: Drafter):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        [first] = self.inner(batch)
        rows = (batch["target_pos"] % 2 == 0).nonzero().squeeze(-1)
        return [first, DraftStep(first.logits[rows] * 0.5, rows)]


class Engine(nn.Module):
    """The part of a DeepSpeed engine that evaluate() uses: forward, .module, train()/eval()."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module(batch)


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo process group on 127.0.0.1 (evaluate's all-reduce runs for real)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def heldout(tiny_cache, process_group, one_torch_thread):
    reader = open_cache(tiny_cache)
    split = heldout_split(scan_index(reader), 0.25, 6)
    spec = LoaderSpec(rank=0, world_size=1, seed=0, batch_tokens=128, heldout_threshold=split.heldout_threshold)
    batches = eval_batches(reader, spec, split.eval_shards, split.eval_ids)
    torch.manual_seed(0)
    drafter = TwoSteps(build_drafter(resolve_drafter_spec("tiny", SMALL, vocab_size=reader.manifest["vocab_size"],
                                                          token_ids={}, max_positions=64))).eval()
    sums = evaluate(Engine(drafter), batches, _dummy_batch(reader.manifest["k"], {}, ()), TargetSource("cache", None,
                    "fp32", torch.device("cpu")), split.eval_ids, 7, torch.device("cpu"))
    records = {r.sample_id: r for r in reader.iter_sequences()}
    return sums, drafter, [records[sid] for sid in split.eval_ids]


def test_evaluate_sums_each_sequence_under_both_tail_modes(heldout):
    sums, drafter, records = heldout
    assert len(records) >= 3 and sums.sample_ids == [r.sample_id for r in records] and sums.step == 7
    for i, record in enumerate(records):  # each sequence scored alone gives its row of the sums
        batch = collate([record], batch_tokens=128)
        target = SparseTarget(batch.topk_ids, batch.topk_logprobs)
        with torch.no_grad():
            steps = drafter(batch.model_inputs())
        for n, step in enumerate(steps):
            rows_target = (target if step.rows is None
                           else SparseTarget(target.ids[step.rows], target.logprobs[step.rows]))
            drop = kl_alpha(step.logits, rows_target, tail="drop")[1]
            _, bucket, _ = kl_alpha(step.logits, rows_target, tail="bucket")
            assert sums.sums[0, i, n] == pytest.approx(float(drop.sum()), rel=1e-5)
            assert sums.sums[1, i, n] == pytest.approx(float(bucket.sum()), rel=1e-5)
            assert sums.sums[3, i, n] == step.logits.shape[0]
    assert (sums.sums[0] <= sums.sums[1] + 1e-9).all() and (sums.sums[1] <= sums.sums[3] + 1e-9).all()


def test_the_eval_record_pools_the_sums_and_keeps_both_bounds(heldout):
    sums, _, records = heldout
    record = sums.record(draft_len=7)
    positions = sums.sums[3].sum(axis=0)
    assert record["alpha_lower"] == pytest.approx((sums.sums[0].sum(axis=0) / positions).tolist())
    assert record["alpha"] == pytest.approx((sums.sums[1].sum(axis=0) / positions).tolist())
    assert record["tau"] == pytest.approx(expected_tau(record["alpha"], 7))
    assert record["tau_lower"] == pytest.approx(expected_tau(record["alpha_lower"], 7))
    assert 1.0 < record["tau_lower"] <= record["tau"]
    assert record["positions"] == positions[0] and record["sequences"] == len(records)
    assert 0 < positions[1] < positions[0]  # step 2 scores a subset of the rows


def test_heldout_json_round_trips_and_refuses_a_damaged_file(heldout, tmp_path):
    sums, _, _ = heldout
    write_heldout(tmp_path, sums, draft_len=7)
    back = read_heldout(tmp_path)
    assert back.sample_ids == sums.sample_ids and back.step == 7
    np.testing.assert_array_equal(back.sums, sums.sums)
    data = json.loads((tmp_path / HELDOUT_JSON).read_text())
    assert data["summary"]["alpha_drop"] == pytest.approx(sums.pooled("alpha_drop_sum"))
    assert data["summary"]["tau_bucket"] == pytest.approx(sums.record(7)["tau"])
    data["positions"] = data["positions"][:-1]
    (tmp_path / HELDOUT_JSON).write_text(json.dumps(data))
    with pytest.raises(HeldoutFileError, match=r"heldout.json: field 'positions' must be a \[sequences="):
        read_heldout(tmp_path)
    with pytest.raises(HeldoutFileError, match="has not been evaluated"):
        read_heldout(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def heldout_exact(heldout, tiny_cache, tiny_target_dir):
    """The same evaluation with the exact α scored against the tiny target's full distribution (online)."""
    _, drafter, records = heldout
    reader = open_cache(tiny_cache)
    split = heldout_split(scan_index(reader), 0.25, 6)
    spec = LoaderSpec(rank=0, world_size=1, seed=0, batch_tokens=128, heldout_threshold=split.heldout_threshold)
    cpu = torch.device("cpu")
    exact = TargetSource("online", str(tiny_target_dir), "fp32", cpu)
    sums = evaluate(Engine(drafter), eval_batches(reader, spec, split.eval_shards, split.eval_ids),
                    _dummy_batch(reader.manifest["k"], {}, ()), TargetSource("cache", None, "fp32", cpu),
                    split.eval_ids, 7, cpu, exact)
    return sums, exact.model


def test_the_exact_alpha_is_the_overlap_with_the_full_target_distribution(heldout, heldout_exact):
    bounds, drafter, records = heldout
    sums, target = heldout_exact
    assert sums.quantities[-1] == EXACT and sums.sums.shape[0] == 5
    np.testing.assert_array_equal(sums.sums[:4], bounds.sums)  # the bounds are unchanged
    for i, record in enumerate(records):  # Σ_V min(p, q) per sequence, written out with softmaxes
        batch = collate([record], batch_tokens=128)
        with torch.no_grad():
            logits = target(input_ids=batch.input_ids).logits[0]  # [T, V]
            p = torch.softmax(logits[batch.target_pos].double(), dim=-1)  # [N, V]
            steps = drafter(batch.model_inputs())
        for n, step in enumerate(steps):
            rows = p if step.rows is None else p[step.rows]
            expected = torch.minimum(rows, torch.softmax(step.logits.double(), dim=-1)).sum()
            assert sums.sums[4, i, n] == pytest.approx(float(expected), rel=1e-4)
    # the exact α lies between the two tail bounds (up to the fp16 rounding of the cached log-probs)
    slack = 1e-3 * sums.sums[3]
    assert (sums.sums[0] <= sums.sums[4] + slack).all() and (sums.sums[4] <= sums.sums[1] + slack).all()
    assert (sums.sums[4] < sums.sums[1] - slack).any()  # the bucket bound is not the exact α
    record = sums.record(draft_len=7)
    assert record["alpha_exact"] == pytest.approx(sums.pooled(EXACT))
    assert record["tau_exact"] == pytest.approx(expected_tau(record["alpha_exact"], 7))


def test_heldout_json_keeps_the_exact_sums_and_reads_files_without_them(heldout, heldout_exact, tmp_path):
    sums, _ = heldout_exact
    write_heldout(tmp_path, sums, draft_len=7)
    back = read_heldout(tmp_path)
    np.testing.assert_array_equal(back.sums, sums.sums)
    summary = json.loads((tmp_path / HELDOUT_JSON).read_text())["summary"]
    assert summary["alpha_exact"] == pytest.approx(sums.pooled(EXACT)) and "tau_exact" in summary
    write_heldout(tmp_path, heldout[0], draft_len=7)  # a run scored without the exact α
    back = read_heldout(tmp_path)
    assert back.quantities == QUANTITIES and "alpha_exact" not in back.record(7)
    data = json.loads((tmp_path / HELDOUT_JSON).read_text())
    data[EXACT] = [[0.0]] * len(data["sample_ids"])  # one step where the others have two
    (tmp_path / HELDOUT_JSON).write_text(json.dumps(data))
    with pytest.raises(HeldoutFileError, match="alpha_exact_sum differ in shape"):
        read_heldout(tmp_path)


def test_a_run_without_scored_positions_pools_to_zero():
    sums = HeldoutSums(["a"], np.zeros((4, 1, 2)))
    with pytest.raises(KeyError, match="'alpha_exact_sum' was not scored"):
        sums.pooled(EXACT)
    with pytest.raises(ValueError, match=r"must be \[4 or 5, sequences, steps\], got shape \(6, 1, 2\)"):
        HeldoutSums(["a"], np.zeros((6, 1, 2)))
    record = sums.record(draft_len=3)
    assert record["alpha"] == [0.0, 0.0] and record["tau"] == 1.0 and record["sequences"] == 0
