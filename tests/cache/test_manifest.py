"""Manifest: atomic rewrites, deterministic content, resume semantics, content keys."""
from __future__ import annotations

import json
import os

import pytest
from cache_builders import IDENTITY, K, VOCAB, accepted_files, build_cache, shard_records

import cache.keys
from cache import (CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError, CacheWriter,
                   content_key, create_manifest, load_manifest, open_cache)
from cache.manifest import MANIFEST_NAME


def _create(cache_dir, **overrides):
    args = dict(key=content_key(IDENTITY), identity=IDENTITY, k=K, vocab_size=VOCAB, tokenizer_sha256="a" * 64,
                features={}, num_shards_planned=3)
    return create_manifest(cache_dir, **{**args, **overrides})


def test_content_key_is_canonical_and_sensitive():
    key = content_key({"a": 1, "b": [1, 2], "c": {"x": 1.5}})
    assert len(key) == 20 and key == content_key({"c": {"x": 1.5}, "b": [1, 2], "a": 1})
    assert key != content_key({"a": 1, "b": [2, 1], "c": {"x": 1.5}})
    assert key != content_key({"a": 1, "b": [1, 2], "c": {"x": 1.25}})
    with pytest.raises(CacheError, match="canonical JSON"):
        content_key({"a": float("nan")})
    with pytest.raises(CacheError, match="canonical JSON"):
        content_key({"a": object()})


def test_content_key_includes_format_version(monkeypatch):
    key = content_key(IDENTITY)
    monkeypatch.setattr(cache.keys, "FORMAT_VERSION", cache.keys.FORMAT_VERSION + 1)
    assert content_key(IDENTITY) != key


def test_new_manifest_is_incomplete_and_resume_returns_it(cache_dir):
    manifest = _create(cache_dir)
    assert manifest["complete"] is False and manifest.committed_indices() == set()
    writer = CacheWriter(cache_dir, k=K, vocab_size=VOCAB)
    manifest.record_shard(writer.write_shard(1, shard_records(1)))
    resumed = _create(cache_dir)
    assert resumed.committed_indices() == {1}
    assert resumed["num_sequences"] == 3 and resumed["num_positions"] == manifest["num_positions"] > 0


def test_different_key_or_settings_are_refused(cache_dir):
    _create(cache_dir)
    other = {**IDENTITY, "k": 99}
    with pytest.raises(CacheMismatchError, match=content_key(other)):
        _create(cache_dir, key=content_key(other), identity=other)
    with pytest.raises(CacheMismatchError, match="num_shards_planned"):
        _create(cache_dir, num_shards_planned=4)
    with pytest.raises(CacheError, match="content_key"):
        _create(cache_dir, key="0" * 20)


def test_resumed_build_is_byte_identical_to_a_clean_one(tmp_path):
    clean = build_cache(tmp_path / "clean", num_shards=3)
    # Interrupted build: shards 2 then 0 recorded; shard 1 written but the driver died before recording
    # it, and a writer died mid-write leaving a temp file.
    resumed = tmp_path / "resumed"
    build_cache(resumed, num_shards=3, committed=range(2, -1, -2), finalize=False)
    CacheWriter(resumed, k=K, vocab_size=VOCAB).write_shard(1, shard_records(1))
    (resumed / ".tmp-shard-00001.arrow.123.abcd").write_bytes(b"half a shard")
    with pytest.raises(CacheIncompleteError):
        open_cache(resumed)
    manifest = _create(resumed)
    assert manifest.committed_indices() == {0, 2}
    for index in sorted({0, 1, 2} - manifest.committed_indices()):
        manifest.record_shard(CacheWriter(resumed, k=K, vocab_size=VOCAB).write_shard(index, shard_records(index)))
    manifest.finalize()
    assert accepted_files(resumed) == accepted_files(clean)
    assert open_cache(resumed).verify() == []


def test_manifest_content_is_deterministic(cache_dir):
    build_cache(cache_dir, num_shards=2)
    text = (cache_dir / MANIFEST_NAME).read_text()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=2) + "\n"
    assert [s["index"] for s in data["shards"]] == [0, 1]
    assert data["complete"] is True and data["num_sequences"] == 6


def test_crash_before_rename_keeps_the_old_manifest(cache_dir, monkeypatch):
    manifest = _create(cache_dir)
    before = (cache_dir / MANIFEST_NAME).read_bytes()
    info = CacheWriter(cache_dir, k=K, vocab_size=VOCAB).write_shard(0, shard_records(0))

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        manifest.record_shard(info)
    monkeypatch.undo()
    assert (cache_dir / MANIFEST_NAME).read_bytes() == before
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")], "temp file left behind"
    reader = open_cache(cache_dir, allow_incomplete=True)
    assert reader.shard_indices() == [] and list(reader.iter_sequences()) == []


def test_killed_writer_leftovers_are_never_accepted(cache_dir):
    build_cache(cache_dir, num_shards=2)
    (cache_dir / f".tmp-{MANIFEST_NAME}.99.beef").write_text('{"torn": ')
    CacheWriter(cache_dir, k=K, vocab_size=VOCAB).write_shard(7, shard_records(7))  # never recorded
    reader = open_cache(cache_dir)
    assert reader.shard_indices() == [0, 1]
    assert {r.sample_id.split(":")[0] for r in reader.iter_sequences()} == {"shard0", "shard1"}
    assert reader.verify() == []


def test_torn_manifest_is_reported_as_corrupt(cache_dir):
    build_cache(cache_dir, num_shards=1)
    path = cache_dir / MANIFEST_NAME
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CacheCorruptError, match=MANIFEST_NAME):
        open_cache(cache_dir)


def test_record_shard_checks_the_files_are_here(tmp_path):
    manifest = _create(tmp_path / "cache")
    info = CacheWriter(tmp_path / "elsewhere", k=K, vocab_size=VOCAB).write_shard(0, shard_records(0))
    with pytest.raises(CacheError, match="another directory"):
        manifest.record_shard(info)
    with pytest.raises(CacheError, match="outside"):
        manifest.record_shard(CacheWriter(tmp_path / "cache", k=K, vocab_size=VOCAB).write_shard(5, shard_records(5)))


def test_record_shard_refuses_missing_feature_files(cache_dir):
    manifest = _create(cache_dir, features={"aux": {"dim": 12}})
    info = CacheWriter(cache_dir, k=K, vocab_size=VOCAB).write_shard(0, shard_records(0))
    with pytest.raises(CacheError, match="column groups"):
        manifest.record_shard(info)


def test_finalize_requires_every_planned_shard(cache_dir):
    build_cache(cache_dir, num_shards=3, committed=range(2), finalize=False)
    manifest = _create(cache_dir)
    with pytest.raises(CacheIncompleteError, match=r"\[2\]"):
        manifest.finalize()
    assert not open_cache(cache_dir, allow_incomplete=True).manifest["complete"]


def test_not_a_cache_directory(tmp_path):
    with pytest.raises(CacheError, match="not a cache directory"):
        open_cache(tmp_path)


def test_a_second_manifest_object_never_rolls_a_finished_manifest_back(cache_dir):
    first, second = _create(cache_dir), _create(cache_dir)  # two drivers of one directory
    writer = CacheWriter(cache_dir, k=K, vocab_size=VOCAB)
    infos = [writer.write_shard(index, shard_records(index)) for index in range(3)]
    second.record_shard(infos[1])
    for info in (infos[0], infos[2]):
        first.record_shard(info)  # re-reads the disk: keeps the second driver's shard 1
    first.finalize()
    finished = (cache_dir / MANIFEST_NAME).read_bytes()
    with pytest.raises(CacheError, match="finalized"):
        second.record_shard(infos[0])
    assert (cache_dir / MANIFEST_NAME).read_bytes() == finished
    assert open_cache(cache_dir).shard_indices() == [0, 1, 2]


def test_manifest_writes_wait_for_the_exclusive_lock_holder(cache_dir):
    import threading

    from cache.lock import lock_cache

    manifest = _create(cache_dir)
    info = CacheWriter(cache_dir, k=K, vocab_size=VOCAB).write_shard(0, shard_records(0))
    holder = lock_cache(cache_dir, exclusive=True)
    writer = threading.Thread(target=manifest.record_shard, args=(info,))
    writer.start()
    writer.join(timeout=0.5)
    assert writer.is_alive() and load_manifest(cache_dir).committed_indices() == set()
    holder.release()
    writer.join(timeout=10)
    assert load_manifest(cache_dir).committed_indices() == {0}


def test_create_manifest_needs_the_directorys_held_exclusive_lock(tmp_path):
    from cache.lock import lock_cache

    with lock_cache(tmp_path / "other", exclusive=True) as other:
        with pytest.raises(CacheError, match="held exclusive lock"):
            _create(tmp_path / "cache", lock=other)
    with lock_cache(tmp_path / "cache", exclusive=True) as lock:
        manifest = _create(tmp_path / "cache", lock=lock)
        info = CacheWriter(tmp_path / "cache", k=K, vocab_size=VOCAB).write_shard(0, shard_records(0))
        manifest.record_shard(info)  # under the held lock: no second lock, no deadlock
    assert load_manifest(tmp_path / "cache").committed_indices() == {0}


def _lie(cache_dir, edit) -> None:
    """Rewrite manifest.json with `edit` applied: what a user or a buggy tool might do by hand."""
    path = cache_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _drop_shard_1(data) -> None:
    dropped = data["shards"].pop(1)
    data["num_sequences"] -= dropped["num_sequences"]
    data["num_positions"] -= dropped["num_positions"]


def test_a_complete_manifest_missing_a_planned_shard_is_refused(cache_dir):
    build_cache(cache_dir, num_shards=3)
    _lie(cache_dir, _drop_shard_1)  # totals adjusted, complete still true
    with pytest.raises(CacheCorruptError, match=r"complete is true but shards lists 2 of the "
                                                r"num_shards_planned=3 shards \(missing \[1\]\)"):
        open_cache(cache_dir)
    _lie(cache_dir, lambda data: data.update(complete=False))
    assert open_cache(cache_dir, allow_incomplete=True).shard_indices() == [0, 2]  # an honest partial build


def test_a_shard_count_that_disagrees_with_its_file_is_refused(cache_dir):
    build_cache(cache_dir, num_shards=2)

    def one_sequence_less(data):
        data["shards"][0]["num_sequences"] -= 1
        data["num_sequences"] -= 1

    _lie(cache_dir, one_sequence_less)
    with pytest.raises(CacheCorruptError, match=r"shard 0: shard-00000\.arrow holds 3 sequences / \d+ positions, "
                                                r"the manifest says num_sequences=2"):
        open_cache(cache_dir)
