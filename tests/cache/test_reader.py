"""CacheReader: round trip, rank partitioning, corruption, compatibility, versions, lazy feature reads."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from cache_builders import IDENTITY, K, VOCAB, build_cache, shard_records

import cache.schema
from cache import (FORMAT_VERSION, CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError,
                   CacheReader, CacheWriter, content_key, create_manifest, load_manifest, open_cache)
from cache.manifest import MANIFEST_NAME

FEATURES = ("last", "aux")


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip_with_features(cache_dir):
    reader = open_cache(build_cache(cache_dir, num_shards=2, features=FEATURES))
    expected = [r for index in range(2) for r in shard_records(index, features=FEATURES)]
    got = list(reader.iter_sequences(columns=["aux", "last"]))
    assert [r.sample_id for r in got] == [r.sample_id for r in expected]
    for want, have in zip(expected, got):
        assert have.input_ids.dtype == np.int32 and have.loss_mask.dtype == bool
        assert have.topk_ids.dtype == np.int32 and have.topk_logprobs.dtype == np.float32
        np.testing.assert_array_equal(have.input_ids, want.input_ids)
        np.testing.assert_array_equal(have.loss_mask, want.loss_mask)
        np.testing.assert_array_equal(have.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(have.topk_logprobs, want.topk_logprobs.astype(np.float16).astype(np.float32))
        assert sorted(have.features) == ["aux", "last"]
        for name in FEATURES:
            assert have.features[name].dtype == np.float32
            np.testing.assert_allclose(have.features[name], want.features[name], rtol=2.0 ** -8)
    manifest = reader.manifest
    assert manifest["num_sequences"] == len(expected)
    assert manifest["num_positions"] == sum(r.num_positions for r in expected)
    assert (manifest["k"], manifest["vocab_size"], manifest["format_version"]) == (K, VOCAB, FORMAT_VERSION)
    assert manifest["identity"] == IDENTITY and manifest["key"] == content_key(IDENTITY)
    assert reader.verify() == []


def test_fp32_logprobs_are_exact(cache_dir):
    records = shard_records(0)
    manifest = create_manifest(cache_dir, key=content_key(IDENTITY), identity=IDENTITY, k=K, vocab_size=VOCAB,
                               tokenizer_sha256="a" * 64, features={}, num_shards_planned=1)
    manifest.record_shard(CacheWriter(cache_dir, k=K, vocab_size=VOCAB, logprob_dtype="fp32").write_shard(0, records))
    manifest.finalize()
    for want, have in zip(records, open_cache(cache_dir).iter_sequences()):
        np.testing.assert_array_equal(have.topk_logprobs, want.topk_logprobs)


def test_core_only_read_never_touches_feature_files(cache_dir):
    build_cache(cache_dir, num_shards=2, features=FEATURES)
    for path in cache_dir.glob("shard-*.aux.arrow"):
        path.unlink()
    _flip_byte(next(cache_dir.glob("shard-00000.last.arrow")))
    reader = open_cache(cache_dir)
    records = list(reader.iter_sequences())
    assert len(records) == 6 and all(r.features == {} for r in records)
    with pytest.raises(CacheCorruptError, match=r"shard-00000\.aux\.arrow"):
        list(reader.iter_sequences(columns=["aux"]))
    with pytest.raises(CacheCorruptError, match=r"shard-00000\.last\.arrow"):
        list(reader.iter_sequences(columns=["last"]))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_ranks_partition_the_shards(cache_dir, world_size):
    reader = open_cache(build_cache(cache_dir, num_shards=5))
    seen = Counter()
    for rank in range(world_size):
        for record in reader.iter_sequences(rank=rank, world_size=world_size):
            shard = int(record.sample_id.split(":")[0].removeprefix("shard"))
            assert shard % world_size == rank
            seen[record.sample_id] += 1
    everything = {r.sample_id for index in range(5) for r in shard_records(index)}
    assert set(seen) == everything and set(seen.values()) == {1}


def test_shard_order_sets_the_order_within_a_rank(cache_dir):
    reader = open_cache(build_cache(cache_dir, num_shards=4))
    shards = [r.sample_id.split(":")[0] for r in reader.iter_sequences(rank=1, world_size=2, shard_order=[3, 2, 1, 0])]
    assert list(dict.fromkeys(shards)) == ["shard3", "shard1"]
    with pytest.raises(CacheError, match="9"):
        reader.iter_sequences(shard_order=[0, 9])
    with pytest.raises(CacheError, match="repeated"):
        reader.iter_sequences(shard_order=[1, 1])
    with pytest.raises(CacheError, match="rank"):
        reader.iter_sequences(rank=2, world_size=2)


def test_flipped_byte_is_detected(cache_dir):
    reader = open_cache(build_cache(cache_dir, num_shards=3, features=("aux",)))
    _flip_byte(cache_dir / "shard-00001.arrow")
    _flip_byte(cache_dir / "shard-00002.aux.arrow", offset=10)
    problems = reader.verify()
    assert len(problems) == 2, problems
    assert "shard-00001.arrow" in problems[0] and "shard-00002.aux.arrow" in problems[1]
    with pytest.raises(CacheCorruptError, match=r"shard-00001\.arrow"):
        list(reader.iter_sequences())
    assert len(list(reader.iter_sequences(shard_order=[0, 2]))) == 6  # core of shard 2 is intact


def test_a_valid_but_different_shard_file_is_detected(cache_dir):
    """The swapped-in file is a well-formed shard of the same cache with the same counts: size or sha256 tell."""
    reader = open_cache(build_cache(cache_dir, num_shards=2))
    CacheWriter(cache_dir / "other", k=K, vocab_size=VOCAB).write_shard(0, shard_records(1))
    (cache_dir / "other" / "shard-00000.arrow").replace(cache_dir / "shard-00000.arrow")
    with pytest.raises(CacheCorruptError, match=r"shard-00000\.arrow: sha256"):
        list(reader.iter_sequences())
    size = (cache_dir / "shard-00000.arrow").stat().st_size
    assert f"shard-00000.arrow: {size} bytes, the manifest's shard 0 says bytes" in reader.verify()[0]


def test_missing_files_and_wrong_counts_are_refused_by_open_and_reported_by_verify(cache_dir):
    build_cache(cache_dir, num_shards=2)
    (cache_dir / "shard-00000.arrow").unlink()
    data = json.loads((cache_dir / MANIFEST_NAME).read_text())
    data["shards"][1]["num_positions"] += 1
    data["num_positions"] += 1
    (cache_dir / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CacheCorruptError, match=r"shard-00000\.arrow: cannot read .* \(and 1 more problem"):
        open_cache(cache_dir)
    problems = CacheReader(load_manifest(cache_dir)).verify()
    assert len(problems) == 2, problems
    assert "shard-00000.arrow" in problems[0] and "cannot read" in problems[0]
    assert "shard 1" in problems[1] and f"num_positions={data['shards'][1]['num_positions']}" in problems[1]


def test_verify_reports_an_incomplete_cache(cache_dir):
    build_cache(cache_dir, num_shards=3, committed=range(1), finalize=False)
    assert open_cache(cache_dir, allow_incomplete=True).verify() == ["incomplete: 1 of 3 planned shards committed"]


def test_incomplete_cache_is_refused_unless_allowed(cache_dir):
    build_cache(cache_dir, num_shards=3, committed=[0, 2], finalize=False)
    with pytest.raises(CacheIncompleteError, match="2 of 3"):
        open_cache(cache_dir)
    reader = open_cache(cache_dir, allow_incomplete=True)
    assert reader.shard_indices() == [0, 2]
    assert len(list(reader.iter_sequences())) == 6


def test_check_compatible(cache_dir):
    reader = open_cache(build_cache(cache_dir, num_shards=1, features=("aux",)))
    reader.check_compatible(tokenizer_sha256="a" * 64, vocab_size=VOCAB, requires_features=["aux"])
    with pytest.raises(CacheMismatchError, match=f"{'a' * 64}.*{'b' * 64}"):
        reader.check_compatible(tokenizer_sha256="b" * 64)
    with pytest.raises(CacheMismatchError, match=f"{VOCAB}.*{VOCAB + 1}"):
        reader.check_compatible(vocab_size=VOCAB + 1)
    with pytest.raises(CacheMismatchError, match="last"):
        reader.check_compatible(requires_features=["last"])
    with pytest.raises(CacheMismatchError, match="last"):
        reader.iter_sequences(columns=["last"])


def test_unknown_manifest_format_version_is_refused(cache_dir):
    build_cache(cache_dir, num_shards=1)
    data = json.loads((cache_dir / MANIFEST_NAME).read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (cache_dir / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(CacheMismatchError, match="format version"):
        open_cache(cache_dir)


def test_unknown_shard_format_version_is_refused(cache_dir, monkeypatch):
    monkeypatch.setattr(cache.schema, "FORMAT_VERSION", FORMAT_VERSION + 1)  # a newer writer's shard
    info = CacheWriter(cache_dir, k=K, vocab_size=VOCAB).write_shard(0, shard_records(0))
    monkeypatch.undo()
    manifest = create_manifest(cache_dir, key=content_key(IDENTITY), identity=IDENTITY, k=K, vocab_size=VOCAB,
                               tokenizer_sha256="a" * 64, features={}, num_shards_planned=1)
    manifest.record_shard(info)
    manifest.finalize()
    with pytest.raises(CacheMismatchError, match=f"shard format version {FORMAT_VERSION + 1}"):
        open_cache(cache_dir)
    reader = CacheReader(load_manifest(cache_dir))
    with pytest.raises(CacheMismatchError, match=f"shard format version {FORMAT_VERSION + 1}"):
        list(reader.iter_sequences())
    assert "version" in reader.verify()[0]


def test_empty_shard_reads_back(cache_dir):
    manifest = create_manifest(cache_dir, key=content_key(IDENTITY), identity=IDENTITY, k=K, vocab_size=VOCAB,
                               tokenizer_sha256="a" * 64, features={"aux": {"dim": 12}}, num_shards_planned=1)
    writer = CacheWriter(cache_dir, k=K, vocab_size=VOCAB, features=("aux",), feature_dims={"aux": 12})
    manifest.record_shard(writer.write_shard(0, []))
    manifest.finalize()
    reader = open_cache(cache_dir)
    assert list(reader.iter_sequences(columns=["aux"])) == [] and reader.verify() == []
