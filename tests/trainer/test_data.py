"""Cache -> batches: deterministic order, held-out exclusion, rank partition, exact resume, alignment."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cache import open_cache
from trainer.data import (BatchStream, DataError, LoaderSpec, collate, count_epoch_batches,
                          epoch_record_groups, eval_batches, heldout_split, is_heldout, pack_by_length,
                          scan_index)


@pytest.fixture(scope="module")
def reader(tiny_cache):
    return open_cache(tiny_cache)


@pytest.fixture(scope="module")
def split(reader):
    return heldout_split(scan_index(reader), fraction=0.1, eval_sequences=100)


def _spec(split, rank=0, world_size=1, batch_tokens=160, seed=0):
    return LoaderSpec(rank=rank, world_size=world_size, seed=seed, batch_tokens=batch_tokens,
                      heldout_threshold=split.heldout_threshold, pool_sequences=16)


def _epoch_ids(reader, spec, epoch=0):
    return [[r.sample_id for r in group] for group in epoch_record_groups(reader, spec, epoch)]


def _take(stream, n):
    try:
        return [batch for batch in itertools.islice(stream, n)]
    finally:
        stream.close()


def test_order_is_a_function_of_seed_and_epoch(reader, split):
    spec = _spec(split)
    assert _epoch_ids(reader, spec, 0) == _epoch_ids(reader, spec, 0)
    assert _epoch_ids(reader, spec, 0) != _epoch_ids(reader, spec, 1)
    assert _epoch_ids(reader, spec, 0) != _epoch_ids(reader, _spec(split, seed=1), 0)
    # Every epoch is a permutation of the same training sequences.
    assert sorted(sum(_epoch_ids(reader, spec, 0), [])) == sorted(sum(_epoch_ids(reader, spec, 3), []))


def test_heldout_sequences_are_never_trained_on(reader, split):
    index = scan_index(reader)
    heldout = {e.sample_id for e in index if is_heldout(e.sample_id, split.heldout_threshold)}
    assert 1 <= len(heldout) == split.num_heldout and split.num_train + split.num_heldout == len(index)
    assert set(split.eval_ids) == heldout
    for epoch in range(3):
        trained = set(sum(_epoch_ids(reader, _spec(split), epoch), []))
        assert trained and not trained & heldout
        assert len(trained) == split.num_train


def test_at_least_one_sequence_is_held_out_and_one_trained(reader):
    index = scan_index(reader)
    tiny = heldout_split(index, fraction=1e-12, eval_sequences=8)
    assert tiny.num_heldout == 1 and tiny.eval_ids
    with pytest.raises(DataError, match="all of them held out"):
        heldout_split(index[:1], fraction=0.5, eval_sequences=8)
    with pytest.raises(DataError, match="no sequence with a trained position"):
        heldout_split([], fraction=0.05, eval_sequences=8)


@pytest.mark.parametrize("world_size", [2, 3, 8])  # 8 > 4 shards: sequences are strided instead
def test_ranks_partition_the_training_set(reader, split, world_size):
    for epoch in range(2):
        shares = [set(sum(_epoch_ids(reader, _spec(split, rank, world_size), epoch), []))
                  for rank in range(world_size)]
        assert sum(len(s) for s in shares) == len(set().union(*shares)) == split.num_train


def test_batches_respect_the_token_budget_and_count_matches_the_index(reader, split):
    index = scan_index(reader)
    for world_size, rank in [(1, 0), (2, 1), (8, 5)]:
        spec = _spec(split, rank, world_size)
        groups = list(epoch_record_groups(reader, spec, 2))
        assert count_epoch_batches(index, spec, 2) == len(groups)
        for group in groups:
            assert len(group) * max(len(r.input_ids) for r in group) <= spec.batch_tokens or len(group) == 1


def test_pack_by_length_groups_short_with_short():
    assert pack_by_length([5, 1, 4, 2], batch_tokens=8) == [[1, 3], [2], [0]]
    assert pack_by_length([20], batch_tokens=8) == [[0]]


def test_resumed_stream_continues_exactly(reader, split):
    spec = _spec(split)
    per_epoch = count_epoch_batches(scan_index(reader), spec, 0)
    full = _take(BatchStream(reader, spec, prefetch=2), per_epoch + 5)
    for cut in (3, per_epoch, per_epoch + 2):
        stream = BatchStream(reader, spec, prefetch=2)
        head = _take(stream, cut)
        assert [b.sample_ids for b in head] == [b.sample_ids for b in full[:cut]]
        resumed = _take(BatchStream(reader, spec, start=stream.position, prefetch=3), len(full) - cut)
        assert [b.sample_ids for b in resumed] == [b.sample_ids for b in full[cut:]]
        for a, b in zip(resumed, full[cut:]):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)
    assert stream.position.epoch == 1 and stream.position.batch == 2


def test_stream_reports_a_rank_without_data(reader, split):
    # 40-odd training sequences cannot give every one of 500 workers a sequence.
    stream = BatchStream(reader, _spec(split, rank=499, world_size=500), prefetch=1)
    with pytest.raises(DataError, match="no training sequences"):
        next(stream)
    stream.close()


def test_targets_align_with_the_model_positions_that_predict_them(reader, split, tiny_target_dir):
    """Row j of a batch's targets is the target model's top-k at (target_batch[j], target_pos[j])."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    batch = next(iter(BatchStream(reader, _spec(split, batch_tokens=120), prefetch=1)))
    with torch.no_grad():
        logits = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    top = logits[batch.target_batch, batch.target_pos].log_softmax(-1).topk(batch.topk_ids.shape[1])
    assert torch.equal(top.indices, batch.topk_ids)
    torch.testing.assert_close(top.values, batch.topk_logprobs, atol=2e-2, rtol=1e-2)  # fp16 storage
    assert batch.num_targets == int(batch.attention_mask[:, 1:].sum()) - _unmasked_prompt_tokens(reader, batch)


def _unmasked_prompt_tokens(reader, batch) -> int:
    records = {r.sample_id: r for r in reader.iter_sequences()}
    return sum(int((~records[sid].loss_mask[1:]).sum()) for sid in batch.sample_ids)


def test_truncation_keeps_targets_inside_the_window(reader):
    record = next(reader.iter_sequences())
    batch = collate([record], batch_tokens=10)
    assert batch.input_ids.shape == (1, 10)
    assert int(batch.target_pos.max()) <= 8
    expected = int(record.loss_mask[1:10].sum())
    assert batch.num_targets == expected == batch.topk_ids.shape[0]
    np.testing.assert_array_equal(batch.topk_ids.numpy(), record.topk_ids[:expected])


def test_eval_batches_split_the_scored_sequences_across_ranks(reader, split):
    shares = [eval_batches(reader, _spec(split, rank, 2), split.eval_shards, split.eval_ids) for rank in range(2)]
    scored = [sid for share in shares for batch in share for sid in batch.sample_ids]
    assert sorted(scored) == sorted(split.eval_ids)
    again = eval_batches(reader, _spec(split, 0, 2), split.eval_shards, split.eval_ids)
    assert [b.sample_ids for b in again] == [b.sample_ids for b in shares[0]]
