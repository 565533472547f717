"""Round trips of the array codec: ids exact, log-probs at fp16 rounding, features at bf16."""
from __future__ import annotations

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
    core file per top-k entry stays under naive int32 + fp16 even after zstd (3.2 B here; 6 B raw)."""
    records = synthetic_records(6, vocab_size=49152, k=64, length=(200, 300))
    info = CacheWriter(tmp_path, k=64, vocab_size=49152).write_shard(0, records)
    assert info.bytes["core"] / (info.num_positions * 64) < 2.8
