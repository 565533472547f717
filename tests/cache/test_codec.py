"""Round trips of the array codec: ids exact (raw and ranked in a shard's id table), log-probs at fp16 rounding,
features at bf16."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cache import CacheWriter, codec
from cache.synthetic import synthetic_records


@pytest.mark.parametrize("vocab_size, width", [(2, 1), (256, 1), (257, 2), (49152, 2), (65536, 2),
                                               (65537, 3), (151_936, 3), (1 << 24, 3), ((1 << 24) + 1, 4)])
def test_id_width_is_the_fewest_bytes(vocab_size, width):
    assert codec.id_width(vocab_size) == width


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_ids_round_trip_exactly(width):
    rng = np.random.default_rng(width)
    high = min(256 ** width, 1 << 31)
    ids = rng.integers(0, high, size=(37, 5)).astype(np.int32)
    ids[0, 0], ids[0, 1] = 0, high - 1
    data = codec.encode_ids(ids, width)
    assert len(data) == ids.size * width
    decoded = codec.decode_ids(np.frombuffer(data, np.uint8), width)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded.reshape(ids.shape), ids)


def test_planes_group_bytes_by_significance():
    data = codec.to_planes(np.array([0x0102, 0x0304], dtype=np.uint16), 2)
    assert data == bytes([0x02, 0x04, 0x01, 0x03])


def _descending_logprobs(rng, rows, k):
    logits = rng.normal(0, 4, size=(rows, 5000))
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return -np.sort(-logprobs, axis=1)[:, :k].astype(np.float32)


def test_fp16_logprobs_decode_to_the_fp16_rounding():
    lp = _descending_logprobs(np.random.default_rng(0), 50, 16)
    lp[0] = [0.0, -0.0, -1e-7, -3e-5, -6e-5, -1e-3, -0.5, -1.0, -2.0, -17.3, -100.0, -1e3, -6e4, -65504.0, -7e4, -1e9]
    decoded = codec.decode_logprobs(np.frombuffer(codec.encode_logprobs(lp, "fp16"), np.uint8), 16, "fp16")
    expected = np.maximum(lp, -65504.0).astype(np.float16).astype(np.float32)
    assert decoded.dtype == np.float32 and decoded.shape == lp.shape
    np.testing.assert_array_equal(decoded, expected)
    assert np.all(np.abs(decoded[1:] - lp[1:]) <= np.abs(lp[1:]) * 2.0 ** -11 + 2.0 ** -25)


def test_fp32_logprobs_round_trip_exactly():
    lp = _descending_logprobs(np.random.default_rng(1), 40, 32)
    decoded = codec.decode_logprobs(np.frombuffer(codec.encode_logprobs(lp, "fp32"), np.uint8), 32, "fp32")
    np.testing.assert_array_equal(decoded, lp)


def test_logprob_deltas_are_small():
    """The transform, not zstd, makes sorted log-probs cheap: high bytes of the deltas are mostly zero."""
    lp = _descending_logprobs(np.random.default_rng(2), 200, 64)
    planes = np.frombuffer(codec.encode_logprobs(lp, "fp16"), np.uint8).reshape(2, -1)
    assert np.mean(planes[1] == 0) > 0.9


def test_bf16_features_round_trip():
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((7, 9)) * 10.0 ** rng.integers(-3, 4, (7, 9))).astype(np.float32)
    decoded = codec.decode_bf16(np.frombuffer(codec.encode_bf16(values), np.uint8), 9)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    np.testing.assert_allclose(decoded, values, rtol=2.0 ** -8, atol=0)
    exact = decoded  # bf16 values survive a second round trip unchanged
    np.testing.assert_array_equal(codec.decode_bf16(np.frombuffer(codec.encode_bf16(exact), np.uint8), 9), exact)


def test_bf16_rounds_to_nearest_even():
    halfway_down = np.array([1.0 + 2.0 ** -8], dtype=np.float32)  # tie between 1 and 1 + 2^-7: even is 1
    halfway_up = np.array([1.0 + 3 * 2.0 ** -8], dtype=np.float32)  # tie: even is 1 + 2^-6
    assert codec.decode_bf16(np.frombuffer(codec.encode_bf16(halfway_down), np.uint8), 1)[0, 0] == 1.0
    assert codec.decode_bf16(np.frombuffer(codec.encode_bf16(halfway_up), np.uint8), 1)[0, 0] == 1.0 + 2.0 ** -6


@pytest.mark.parametrize("length", [1, 7, 8, 9, 100])
def test_mask_round_trip(length):
    mask = np.random.default_rng(length).random(length) < 0.5
    data = codec.encode_mask(mask)
    assert len(data) == (length + 7) // 8
    np.testing.assert_array_equal(codec.decode_mask(np.frombuffer(data, np.uint8), length), mask)


def test_core_shard_is_compact(tmp_path):
    """Regression guard at k=64, vocab 49152, on this Zipf-like data (noisier than a real model's): the whole
    core file per top-k entry (2.04 B here with ids ranked in the shard's id table; 6 B naive int32 + fp16)."""
    records = synthetic_records(6, vocab_size=49152, k=64, length=(200, 300))
    info = CacheWriter(tmp_path, k=64, vocab_size=49152).write_shard(0, records)
    assert info.bytes["core"] / (info.num_positions * 64) < 2.3


def test_id_table_puts_frequent_ids_first_by_count_class():
    ids = np.array([9] * 8 + [4] * 9 + [7] * 2 + [3] * 3 + [5])  # counts 8, 9 (class 3); 2, 3 (class 1); 1
    np.testing.assert_array_equal(codec.id_table(ids), [4, 9, 3, 7, 5])
    assert codec.id_table(np.zeros(0, np.int32)).size == 0


@pytest.mark.parametrize("width", [1, 2, 3])
def test_id_tables_round_trip_exactly(width):
    rng = np.random.default_rng(width)
    vocab = min(256 ** width, 200_000)
    for table in (np.zeros(0, np.int64), np.array([vocab - 1]), np.array([0, 5, 3, 4, vocab - 1, 1, 2]),
                  codec.id_table(rng.zipf(1.3, 5000) % vocab)):
        data = np.frombuffer(codec.encode_id_table(table, width), np.uint8)
        np.testing.assert_array_equal(codec.decode_id_table(data, width), table)
    with pytest.raises(ValueError, match="truncated|classes say"):
        codec.decode_id_table(data[:-3], width)


@pytest.mark.parametrize("table_size, width, threshold", [
    (5, 1, 256), (256, 1, 256), (256, 2, 256), (257, 2, 255), (23_133, 2, 166), (49_152, 2, 64), (65_536, 2, 0),
    (151_936, 3, 253), (1 << 24, 3, 0)])
def test_ranked_ids_round_trip_exactly_up_to_the_largest_rank(table_size, width, threshold):
    assert codec.escape_threshold(table_size, width) == threshold
    rng = np.random.default_rng(table_size)
    table = rng.permutation(max(table_size, 256 ** (width - 1) + 1))[:table_size]  # distinct ids, any order
    ranks = np.concatenate([np.arange(min(table_size, 300)), [table_size - 1, max(threshold, 0) % table_size],
                            rng.integers(0, table_size, 500)])
    data = np.frombuffer(codec.encode_ranked_ids(ranks, table_size, width), np.uint8)
    escapes = int((ranks >= threshold).sum())
    assert len(data) == ranks.size + escapes * (width - 1)  # one byte per rank, plus the escaped ranks' low bytes
    decoded = codec.decode_ranked_ids(data, ranks.size, table, width)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, table[ranks])


def test_a_rank_outside_the_table_does_not_decode():
    data = np.frombuffer(codec.encode_ranked_ids(np.array([0, 9]), 10, 1), np.uint8)
    with pytest.raises(ValueError, match="outside the id table of 5 ids"):
        codec.decode_ranked_ids(data, 2, np.arange(5), 1)
    assert codec.escape_threshold(40_001, 2) == codec.escape_threshold(39_900, 2) == 100
    escaped = np.frombuffer(codec.encode_ranked_ids(np.array([0, 40_000]), 40_001, 2), np.uint8)
    with pytest.raises(IndexError):
        codec.decode_ranked_ids(escaped, 2, np.arange(39_900), 2)
    with pytest.raises(ValueError, match="do not hold"):
        codec.decode_ranked_ids(data[:1], 2, np.arange(10), 1)


@pytest.mark.parametrize("logits_dtype", ["fp32", "bf16"])
def test_a_written_shard_reads_back_ids_exactly_and_logprobs_fp16_exact(tmp_path, logits_dtype):
    """Whatever precision the target ran in, the cache returns exactly x.astype(fp16) for log-probs x."""
    from cache import content_key, create_manifest, open_cache

    records = synthetic_records(5, vocab_size=49152, k=64, length=(50, 120), seed=3)
    if logits_dtype == "bf16":  # log-probs of bf16-rounded logits: coarse, many ties
        records = [replace(r, topk_logprobs=_bf16(r.topk_logprobs)) for r in records]
    identity = {"test": logits_dtype}
    manifest = create_manifest(tmp_path, key=content_key(identity), identity=identity, k=64, vocab_size=49152,
                               tokenizer_sha256="0" * 64, features={}, num_shards_planned=2)
    writer = CacheWriter(tmp_path, k=64, vocab_size=49152)
    for index in range(2):
        manifest.record_shard(writer.write_shard(index, records[index::2]))
    manifest.finalize()
    reader = open_cache(tmp_path)
    assert reader.verify() == []
    read = {r.sample_id: r for r in reader.iter_sequences()}
    for record in records:
        back = read[record.sample_id]
        np.testing.assert_array_equal(back.topk_ids, record.topk_ids)
        np.testing.assert_array_equal(back.topk_logprobs, record.topk_logprobs.astype(np.float16).astype(np.float32))


def _bf16(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16 << 16).view(np.float32)


@pytest.mark.parametrize("tamper, message", [
    (lambda tables, width: [b""] + tables[:1] + tables[2:], "not empty after row 0"),
    (lambda tables, width: [codec.encode_id_table(np.array([3, 49152]), width)] + tables[1:], r"outside \[0, 49152\)"),
    (lambda tables, width: [tables[0][:-1]] + tables[1:], "does not decode"),
])
def test_a_malformed_id_table_is_refused(tamper, message):
    from cache import CacheCorruptError
    from cache.schema import CORE, CORE_FIELDS, CORE_ZSTD_LEVEL, ID_TABLE_COLUMN, write_ipc
    from cache.shard import core_columns, iter_core

    records = synthetic_records(3, vocab_size=49152, k=8, length=(20, 40))
    columns = core_columns(records, vocab_size=49152, logprob_dtype="fp16")
    columns[ID_TABLE_COLUMN] = tamper(columns[ID_TABLE_COLUMN], codec.id_width(49152))
    meta = {"group": CORE, "k": 8, "vocab_size": 49152, "logprob_dtype": "fp16"}
    data = write_ipc(CORE_FIELDS, meta, columns, CORE_ZSTD_LEVEL)
    with pytest.raises(CacheCorruptError, match=message):
        list(iter_core(data, "shard-00000.arrow", k=8, vocab_size=49152))
