"""Cache -> token-budget batches for one data-parallel worker.

Order: epoch e permutes the cache's shards with a generator seeded by (seed, e); worker r of W
reads permuted shards r, r+W, ... (or, when the cache has fewer shards than workers, every shard
and every W-th sequence). Sequences are grouped into pools of `pool_sequences` in stream order;
each pool is sorted by length, packed into batches of at most `batch_tokens` padded tokens
(B × T_max) and its batches are shuffled with a generator seeded by (seed, e, r). Everything is a
function of (seed, epoch, rank, world size), so a data position (epoch, batches consumed) restores
the stream exactly. Sequences whose sample-id hash falls below the held-out threshold are never
yielded for training.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

HASH_BITS = 64


class DataError(ValueError):
    """Unusable data: a dataset (missing, unknown format, fetch failed) or a cache too small for the training."""


def sample_hash(sample_id: str) -> int:
    """A stable 64-bit hash of a sample id (the held-out split depends on nothing else)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big")


def is_heldout(sample_id: str, threshold: int) -> bool:
    """True if the sequence belongs to the held-out slice (never trained on)."""
    return sample_hash(sample_id) < threshold


# --------------------------------------------------------------------------------- index & split
@dataclass(frozen=True)
class IndexEntry:
    """What the split and the step count need to know about one cached sequence."""

    shard: int
    sample_id: str
    num_tokens: int
    num_positions: int


def scan_index(reader) -> list[IndexEntry]:
    """(shard, sample id, length, trained positions) of every sequence, in shard order."""
    if hasattr(reader, "iter_index"):  # cheap path: the small columns only
        return [IndexEntry(*row) for row in reader.iter_index()]
    entries = []
    for shard in reader.shard_indices():
        for record in reader.iter_sequences(shard_order=[shard]):
            entries.append(IndexEntry(shard, record.sample_id, len(record.input_ids), record.num_positions))
    return entries


@dataclass(frozen=True)
class Split:
    """The held-out slice: a hash threshold, its size, and the sequences scored at each evaluation."""

    heldout_threshold: int
    num_train: int
    num_heldout: int
    eval_ids: list[str]
    eval_shards: dict[int, list[str]]


def heldout_split(index: Sequence[IndexEntry], fraction: float, eval_sequences: int) -> Split:
    """Hold out sequences with hash < fraction·2^64 (at least one); the first `eval_sequences` by hash are scored."""
    usable = [e for e in index if e.num_positions > 0]
    if not usable:
        raise DataError("the cache holds no sequence with a trained position (is it empty?)")
    hashes = {e.sample_id: sample_hash(e.sample_id) for e in usable}
    threshold = int(fraction * 2**HASH_BITS)
    if not any(h < threshold for h in hashes.values()):
        threshold = min(hashes.values()) + 1  # at least one held-out sequence
    heldout = sorted((h, e.sample_id, e.shard) for e in usable if (h := hashes[e.sample_id]) < threshold)
    num_train = len(usable) - len(heldout)
    if num_train == 0:
        raise DataError(f"the cache holds {len(usable)} trainable sequence(s), all of them held out; "
                        "build a larger cache or lower --heldout-fraction")
    chosen = heldout[:eval_sequences]
    eval_shards: dict[int, list[str]] = {}
    for _, sample_id, shard in chosen:
        eval_shards.setdefault(shard, []).append(sample_id)
    return Split(threshold, num_train, len(heldout), [sid for _, sid, _ in chosen], eval_shards)


# ------------------------------------------------------------------------------------- ordering
def epoch_shards(shards: Sequence[int], *, seed: int, epoch: int, rank: int, world_size: int) -> tuple[list[int], bool]:
    """The shards rank reads in epoch, in order, and whether sequences are strided across ranks instead."""
    order = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    if len(shards) >= world_size:
        return order[rank::world_size], False
    return order, True


def _epoch_items(items: Iterable[Any], *, rank: int, world_size: int, strided: bool, threshold: int,
                 sample_id: Callable[[Any], str], num_positions: Callable[[Any], int]) -> Iterator[Any]:
    """Training items of this rank: held-out and target-less sequences dropped, strided if needed."""
    count = 0
    for item in items:
        if num_positions(item) == 0 or is_heldout(sample_id(item), threshold):
            continue
        if not strided or count % world_size == rank:
            yield item
        count += 1


def pack_by_length(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches with len(batch) × max length <= batch_tokens, shortest first."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        length = min(lengths[i], batch_tokens)
        if current and max(longest, length) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def _pooled_batches(items: Iterable[Any], *, length: Callable[[Any], int], batch_tokens: int,
                    pool_sequences: int, rng: np.random.Generator | None) -> Iterator[list[Any]]:
    """Pools of consecutive items -> length-sorted batches, shuffled within the pool (rng=None: in order)."""
    def flush(pool):
        batches = pack_by_length([length(item) for item in pool], batch_tokens)
        order = rng.permutation(len(batches)) if rng is not None else range(len(batches))
        for j in order:
            yield [pool[i] for i in batches[j]]

    pool: list[Any] = []
    for item in items:
        pool.append(item)
        if len(pool) == pool_sequences:
            yield from flush(pool)
            pool = []
    if pool:
        yield from flush(pool)


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that fixes a rank's batch order (identical on resume)."""

    rank: int
    world_size: int
    seed: int
    batch_tokens: int
    heldout_threshold: int
    pool_sequences: int = 256
    columns: tuple[str, ...] = ()  # cache feature columns to read
    pad_id: int = 0


def epoch_record_groups(reader, spec: LoaderSpec, epoch: int) -> Iterator[list]:
    """Lists of SequenceRecords, one per batch, of this rank's epoch `epoch`."""
    shards, strided = epoch_shards(reader.shard_indices(), seed=spec.seed, epoch=epoch, rank=spec.rank,
                                   world_size=spec.world_size)
    records = reader.iter_sequences(columns=list(spec.columns), shard_order=shards) if shards else iter(())
    items = _epoch_items(records, rank=spec.rank, world_size=spec.world_size, strided=strided,
                         threshold=spec.heldout_threshold, sample_id=lambda r: r.sample_id,
                         num_positions=lambda r: r.num_positions)
    rng = np.random.default_rng([spec.seed, epoch, spec.rank])
    yield from _pooled_batches(items, length=lambda r: len(r.input_ids), batch_tokens=spec.batch_tokens,
                               pool_sequences=spec.pool_sequences, rng=rng)


def count_epoch_batches(index: Sequence[IndexEntry], spec: LoaderSpec, epoch: int) -> int:
    """How many batches epoch_record_groups yields, computed from the index alone (no decoding)."""
    by_shard: dict[int, list[IndexEntry]] = {}
    for entry in index:
        by_shard.setdefault(entry.shard, []).append(entry)
    shards, strided = epoch_shards(sorted(by_shard), seed=spec.seed, epoch=epoch, rank=spec.rank,
                                   world_size=spec.world_size)
    entries = (e for shard in shards for e in by_shard[shard])
    items = _epoch_items(entries, rank=spec.rank, world_size=spec.world_size, strided=strided,
                         threshold=spec.heldout_threshold, sample_id=lambda e: e.sample_id,
                         num_positions=lambda e: e.num_positions)
    return sum(1 for _ in _pooled_batches(items, length=lambda e: e.num_tokens, batch_tokens=spec.batch_tokens,
                                          pool_sequences=spec.pool_sequences, rng=None))


# ------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Padded token ids plus the top-k targets of every trained position (N rows in total)."""

    input_ids: Tensor  # [B, T] int64, right-padded
    attention_mask: Tensor  # [B, T] int64
    target_batch: Tensor  # [N] int64: batch row of each target
    target_pos: Tensor  # [N] int64: model output position predicting the target token (t − 1)
    topk_ids: Tensor  # [N, k] int64
    topk_logprobs: Tensor  # [N, k] float32
    sample_ids: list[str]
    features: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, T, dim] float32

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        return int(self.target_pos.shape[0])

    def model_inputs(self) -> dict[str, Tensor]:
        """What a drafter's forward reads."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "target_batch": self.target_batch, "target_pos": self.target_pos, **self.features}

    def to(self, device) -> Batch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.target_batch),
                     move(self.target_pos), move(self.topk_ids), move(self.topk_logprobs), self.sample_ids,
                     {name: move(t) for name, t in self.features.items()})


_warned_truncation = False


def collate(records: Sequence, *, batch_tokens: int, pad_id: int = 0, columns: Sequence[str] = ()) -> Batch:
    """Right-pad records into [B, T]; sequences longer than batch_tokens are truncated (with their targets)."""
    global _warned_truncation
    lengths = [min(len(r.input_ids), batch_tokens) for r in records]
    if any(len(r.input_ids) > batch_tokens for r in records) and not _warned_truncation:
        warnings.warn(f"sequences longer than --batch-tokens {batch_tokens} are truncated", stacklevel=2)
        _warned_truncation = True
    b, t = len(records), max(lengths)
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    attention_mask = np.zeros((b, t), dtype=np.int64)
    target_batch, target_pos, topk_ids, topk_logprobs = [], [], [], []
    for row, (record, length) in enumerate(zip(records, lengths)):
        input_ids[row, :length] = record.input_ids[:length]
        attention_mask[row, :length] = 1
        # Target row j is the distribution of token t_j (the j-th t >= 1 with loss_mask[t]),
        # produced by the model at position t_j − 1.
        positions = np.flatnonzero(record.loss_mask[1:length]) + 1
        n = positions.shape[0]
        target_batch.append(np.full(n, row, dtype=np.int64))
        target_pos.append(positions - 1)
        topk_ids.append(record.topk_ids[:n])
        topk_logprobs.append(record.topk_logprobs[:n])
    features = {}
    for name in columns:
        dim = records[0].features[name].shape[1]
        values = np.zeros((b, t, dim), dtype=np.float32)
        for row, (record, length) in enumerate(zip(records, lengths)):
            values[row, :length] = record.features[name][:length]
        features[name] = torch.from_numpy(values)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        target_batch=torch.from_numpy(np.concatenate(target_batch)),
        target_pos=torch.from_numpy(np.concatenate(target_pos).astype(np.int64)),
        topk_ids=torch.from_numpy(np.concatenate(topk_ids).astype(np.int64)),
        topk_logprobs=torch.from_numpy(np.concatenate(topk_logprobs).astype(np.float32)),
        sample_ids=[r.sample_id for r in records],
        features=features,
    )


# ---------------------------------------------------------------------------------- the stream
@dataclass(frozen=True)
class DataPosition:
    """Where a rank's stream stands: `batch` batches of `epoch` already consumed."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}


_END = object()


class BatchStream:
    """This rank's endless stream of training batches, epoch after epoch, decoded by a background thread.

    `position` is the position after the last batch handed out: a stream created with it continues
    with exactly the next batch.
    """

    def __init__(self, reader, spec: LoaderSpec, start: DataPosition = DataPosition(), prefetch: int = 4):
        self.reader, self.spec = reader, spec
        self.position = start
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), name="lkspec-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        epoch, index, batch = item
        self.position = DataPosition(epoch, index + 1)
        return batch

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, start: DataPosition) -> None:
        try:
            epoch = start.epoch
            while not self._stop.is_set():
                produced = 0
                for index, group in enumerate(epoch_record_groups(self.reader, self.spec, epoch)):
                    produced += 1
                    if epoch == start.epoch and index < start.batch:
                        continue  # resuming: these batches were consumed before the checkpoint
                    batch = collate(group, batch_tokens=self.spec.batch_tokens, pad_id=self.spec.pad_id,
                                    columns=self.spec.columns)
                    if not self._put((epoch, index, batch)):
                        return
                if produced == 0:
                    raise DataError(f"worker {self.spec.rank} of {self.spec.world_size} has no training "
                                    f"sequences in epoch {epoch}: the cache is too small for this many workers")
                epoch += 1
        except BaseException as exc:  # handed to the consumer, raised in the training loop
            self._put(exc)

    def close(self) -> None:
        """Stop the prefetch thread (idempotent)."""
        self._stop.set()
        self._thread.join(timeout=5)


def eval_batches(reader, spec: LoaderSpec, eval_shards: dict, eval_ids: Sequence[str]) -> list[Batch]:
    """This rank's share (every world_size-th) of the held-out sequences scored at evaluation, as batches."""
    mine = list(eval_ids)[spec.rank::spec.world_size]
    wanted = set(mine)
    shards = sorted(int(shard) for shard, ids in eval_shards.items() if wanted & set(ids))
    found = {}
    if shards:
        for record in reader.iter_sequences(columns=list(spec.columns), shard_order=shards):
            if record.sample_id in wanted:
                found[record.sample_id] = record
    missing = wanted - set(found)
    if missing:
        raise DataError(f"held-out sequences {sorted(missing)[:3]} are not in the cache any more")
    records = [found[sid] for sid in mine]
    groups = _pooled_batches(records, length=lambda r: len(r.input_ids), batch_tokens=spec.batch_tokens,
                             pool_sequences=max(1, len(records)), rng=None)
    return [collate(group, batch_tokens=spec.batch_tokens, pad_id=spec.pad_id, columns=spec.columns)
            for group in groups]
