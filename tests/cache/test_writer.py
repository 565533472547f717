"""CacheWriter: record validation (errors name the sample and field) and deterministic bytes."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cache_builders import DIMS, K, VOCAB, accepted_files, shard_records

from cache import CacheError, CacheWriter, SequenceRecord


def _writer(directory: Path, features: tuple[str, ...] = ()) -> CacheWriter:
    return CacheWriter(directory, k=K, vocab_size=VOCAB, features=features, feature_dims=DIMS)


def test_same_records_give_identical_files(tmp_path):
    records = shard_records(0, features=("aux",))
    first = _writer(tmp_path / "a", ("aux",)).write_shard(4, records)
    second = _writer(tmp_path / "b", ("aux",)).write_shard(4, records)
    assert first == second
    assert accepted_files(tmp_path / "a") == accepted_files(tmp_path / "b")
    assert sorted(accepted_files(tmp_path / "a")) == ["shard-00004.arrow", "shard-00004.aux.arrow"]


def test_identical_files_across_processes(tmp_path):
    """No uninitialised memory or per-process state leaks into the bytes."""
    script = ("import sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]; from cache_builders import *; "
              "from cache import CacheWriter; "
              "CacheWriter(sys.argv[1], k=K, vocab_size=VOCAB, features=('last',), feature_dims=DIMS)"
              ".write_shard(0, shard_records(0, features=('last',)))")
    tests_dir, root = str(Path(__file__).parent), str(Path(__file__).parents[2])
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name), tests_dir, root], check=True)
    _writer(tmp_path / "c", ("last",)).write_shard(0, shard_records(0, features=("last",)))
    assert accepted_files(tmp_path / "a") == accepted_files(tmp_path / "b") == accepted_files(tmp_path / "c")


def test_shard_info_round_trips_through_json_dict(tmp_path):
    info = _writer(tmp_path).write_shard(2, shard_records(2))
    assert type(info).from_dict(info.to_dict()) == info
    assert info.num_sequences == 3 and info.num_positions == sum(r.num_positions for r in shard_records(2))
    with pytest.raises(CacheError, match="keys"):
        type(info).from_dict({**info.to_dict(), "extra": 1})


def _replace(record: SequenceRecord, **changes) -> SequenceRecord:
    return dataclasses.replace(record, **changes)


def _unsorted(r):
    lp = r.topk_logprobs.copy()
    lp[1, [0, 1]] = lp[1, [1, 0]]
    return _replace(r, topk_logprobs=lp)


def _set(array, index, value):
    array = array.copy()
    array[index] = value
    return array


BAD_RECORDS = {
    "wrong k": (lambda r: _replace(r, topk_ids=r.topk_ids[:, :-1], topk_logprobs=r.topk_logprobs[:, :-1]),
                "topk_ids", "k=8"),
    "topk id out of range": (lambda r: _replace(r, topk_ids=_set(r.topk_ids, (0, 3), VOCAB)), "topk_ids", "outside"),
    "negative topk id": (lambda r: _replace(r, topk_ids=_set(r.topk_ids, (2, 0), -1)), "topk_ids", "outside"),
    "input id out of range": (lambda r: _replace(r, input_ids=_set(r.input_ids, 0, VOCAB + 5)), "input_ids", "outside"),
    "repeated id": (lambda r: _replace(r, topk_ids=_set(r.topk_ids, (1, 1), r.topk_ids[1, 0])), "topk_ids", "repeats"),
    "float ids": (lambda r: _replace(r, topk_ids=r.topk_ids.astype(np.float32)), "topk_ids", "integer dtype"),
    "NaN log-prob": (lambda r: _replace(r, topk_logprobs=_set(r.topk_logprobs, (0, 2), np.nan)),
                     "topk_logprobs", "NaN"),
    "inf log-prob": (lambda r: _replace(r, topk_logprobs=_set(r.topk_logprobs, (0, -1), -np.inf)),
                     "topk_logprobs", "inf"),
    "positive log-prob": (lambda r: _replace(r, topk_logprobs=_set(r.topk_logprobs, (0, 0), 0.5)),
                          "topk_logprobs", "> 0"),
    "unsorted": (_unsorted, "topk_logprobs", "not sorted"),
    "not normalized": (lambda r: _replace(r, topk_logprobs=r.topk_logprobs - r.topk_logprobs[:, :1]),
                       "topk_logprobs", "normalized over the full vocabulary"),
    "P mismatch": (lambda r: _replace(r, loss_mask=_set(r.loss_mask, -1, not r.loss_mask[-1])), "topk_ids", "P="),
    "mask length": (lambda r: _replace(r, loss_mask=r.loss_mask[:-1]), "loss_mask", "shape"),
    "mask dtype": (lambda r: _replace(r, loss_mask=r.loss_mask.astype(np.int8)), "loss_mask", "bool dtype"),
    "list not array": (lambda r: _replace(r, input_ids=r.input_ids.tolist()), "input_ids", "numpy array"),
    "missing feature": (lambda r: _replace(r, features={}), "features", "aux"),
    "feature shape": (lambda r: _replace(r, features={"aux": r.features["aux"][:, :-1]}), "features['aux']", "shape"),
    "NaN feature": (lambda r: _replace(r, features={"aux": _set(r.features["aux"], (0, 0), np.nan)}),
                    "features['aux']", "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_rejected_naming_sample_and_field(tmp_path, case):
    mutate, field, problem = BAD_RECORDS[case]
    records = shard_records(0, features=("aux",))
    records[1] = mutate(records[1])
    with pytest.raises(CacheError) as excinfo:
        _writer(tmp_path, ("aux",)).write_shard(0, records)
    message = str(excinfo.value)
    assert f"'{records[1].sample_id}'" in message and f"{field}:" in message and problem in message, message
    assert not tmp_path.exists() or not any(tmp_path.iterdir()), "a rejected shard must write nothing"


def test_repeated_sample_id_is_rejected(tmp_path):
    records = shard_records(0)
    records[2] = _replace(records[2], sample_id=records[0].sample_id)
    with pytest.raises(CacheError, match=f"'{records[0].sample_id}': sample_id: appears twice"):
        _writer(tmp_path).write_shard(0, records)


def test_record_without_trained_positions_and_empty_shard_are_valid(tmp_path):
    record = shard_records(0)[0]
    empty = _replace(record, loss_mask=np.zeros_like(record.loss_mask), topk_ids=np.zeros((0, K), np.int32),
                     topk_logprobs=np.zeros((0, K), np.float32))
    assert _writer(tmp_path).write_shard(0, [empty]).num_positions == 0
    assert _writer(tmp_path).write_shard(1, []).num_sequences == 0


@pytest.mark.parametrize("kwargs, problem", [
    ({"k": VOCAB + 1}, "k <= vocab_size"),
    ({"k": 0}, "k <= vocab_size"),
    ({"logprob_dtype": "int8"}, "logprob_dtype"),
    ({"features": ("aux",), "feature_dims": {}}, "dimension"),
    ({"features": ("Aux!",), "feature_dims": {"Aux!": 3}}, "invalid feature name"),
    ({"features": ("core",), "feature_dims": {"core": 3}}, "invalid feature name"),
    ({"features": ("aux",), "feature_dims": {"aux": 0}}, "positive integer dimension"),
])
def test_bad_writer_settings_are_rejected(tmp_path, kwargs, problem):
    with pytest.raises(CacheError, match=problem):
        CacheWriter(tmp_path, **{"k": K, "vocab_size": VOCAB, **kwargs})


def test_negative_shard_index_is_rejected(tmp_path):
    with pytest.raises(CacheError, match="shard index"):
        _writer(tmp_path).write_shard(-1, shard_records(0))
