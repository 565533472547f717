"""Held-out acceptance of a drafter: per-sequence sums per draft step, their pooled means, heldout.json.

`trainer.loop.evaluate` scores every held-out sequence against the cached target under both tail
modes and sums, per sequence and draft step: α with the tail dropped (Σ over the cached top-k of
min(p, q): a lower bound of the true α), α with the tail as one bucket (+ min(r, Q_tail): an upper
bound), KL and the number of scored positions. With `--exact-heldout` (or a run trained online) it
also sums the exact α, Σ_V min(p, q) against the target's full distribution. Pooled means of those
sums are the eval record; the sums themselves go to heldout.json so that α can be bootstrapped over
sequences (eval.stats):

    RUNS/<name>/heldout.json = {
      "format": 1, "step": <training step>, "tau_draft_len": K,
      "sample_ids": [S ids],
      "alpha_drop_sum": [S][steps], "alpha_bucket_sum": [S][steps], "kl_sum": [S][steps],
      "positions": [S][steps],
      "alpha_exact_sum": [S][steps],  (only when the exact α was scored)
      "summary": {alpha_drop, alpha_bucket[, alpha_exact]: [steps], tau_drop, tau_bucket[, tau_exact], ...}}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.losses import expected_tau
from trainer.rundir import write_json

HELDOUT_JSON = "heldout.json"
FORMAT = 1
QUANTITIES = ("alpha_drop_sum", "alpha_bucket_sum", "kl_sum", "positions")  # rows of HeldoutSums.sums
EXACT = "alpha_exact_sum"  # a fifth row when the exact α was scored (against the target's full distribution)


class HeldoutFileError(ValueError):
    """A heldout.json that cannot be read (the message names the file and field)."""


@dataclass
class HeldoutSums:
    """Per held-out sequence and draft step: Σα (tail dropped), Σα (tail bucket), ΣKL, positions[, Σα exact]."""

    sample_ids: list[str]
    sums: np.ndarray  # [4 (QUANTITIES) or 5 (+ EXACT), sequences, steps] float64
    step: int | None = None  # the training step evaluated

    def __post_init__(self):
        if self.sums.ndim != 3 or self.sums.shape[0] not in (len(QUANTITIES), len(QUANTITIES) + 1):
            raise ValueError(f"held-out sums must be [{len(QUANTITIES)} or {len(QUANTITIES) + 1}, sequences, steps], "
                             f"got shape {self.sums.shape}")

    @property
    def quantities(self) -> tuple[str, ...]:
        """The names of the rows of `sums`: QUANTITIES, then EXACT when the exact α was scored."""
        return QUANTITIES + ((EXACT,) if self.sums.shape[0] > len(QUANTITIES) else ())

    def pooled(self, quantity: str) -> list[float]:
        """Σ over sequences of `quantity` ÷ Σ positions, per draft step (0 where no position was scored)."""
        if quantity not in self.quantities:
            raise KeyError(f"{quantity!r} was not scored (scored: {', '.join(self.quantities)})")
        totals = self.sums.sum(axis=1)  # [quantities, steps]
        counts = np.maximum(totals[QUANTITIES.index("positions")], 1.0)
        return (totals[self.quantities.index(quantity)] / counts).tolist()

    def record(self, draft_len: int) -> dict[str, Any]:
        """The eval record: α with the tail as a bucket ("alpha") and dropped ("alpha_lower"), KL, expected τ;
        the exact α ("alpha_exact", "tau_exact") when it was scored."""
        alpha, alpha_lower = self.pooled("alpha_bucket_sum"), self.pooled("alpha_drop_sum")
        positions = self.sums[QUANTITIES.index("positions")]  # [sequences, steps]
        record = {
            "step": self.step,
            "alpha": alpha,
            "alpha_lower": alpha_lower,
            "kl": self.pooled("kl_sum"),
            "tau": expected_tau(alpha, draft_len),
            "tau_lower": expected_tau(alpha_lower, draft_len),
            "positions": int(positions[:, 0].sum()) if positions.shape[1] else 0,
            "sequences": int((positions.sum(axis=1) > 0).sum()),
        }
        if EXACT in self.quantities:
            record["alpha_exact"] = self.pooled(EXACT)
            record["tau_exact"] = expected_tau(record["alpha_exact"], draft_len)
        return record

    def to_json(self, draft_len: int) -> dict[str, Any]:
        """heldout.json's content."""
        return {"format": FORMAT, "step": self.step, "tau_draft_len": draft_len, "sample_ids": list(self.sample_ids),
                **{name: self.sums[i].tolist() for i, name in enumerate(self.quantities)},
                "summary": acceptance_summary(self.record(draft_len), draft_len)}


def acceptance_summary(record: dict[str, Any], draft_len: int) -> dict[str, Any]:
    """An eval record under explicit names (run.json's `heldout` measurement, heldout.json's summary)."""
    summary = {"step": record.get("step"), "alpha_drop": record["alpha_lower"], "alpha_bucket": record["alpha"],
               "tau_drop": record["tau_lower"], "tau_bucket": record["tau"], "tau_draft_len": draft_len,
               "kl": record["kl"], "sequences": record.get("sequences"), "positions": record["positions"]}
    if "alpha_exact" in record:
        summary.update(alpha_exact=record["alpha_exact"], tau_exact=record["tau_exact"])
    return summary


def write_heldout(run_dir: Path, sums: HeldoutSums, draft_len: int) -> None:
    """Write RUN/heldout.json atomically."""
    write_json(Path(run_dir) / HELDOUT_JSON, sums.to_json(draft_len))


def read_heldout(run_dir: Path) -> HeldoutSums:
    """RUN/heldout.json as HeldoutSums (HeldoutFileError naming the file and field when it is not one)."""
    path = Path(run_dir) / HELDOUT_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HeldoutFileError(f"{path}: cannot read held-out sums ({exc}); the run has not been evaluated") from exc
    if data.get("format") != FORMAT:
        raise HeldoutFileError(f"{path}: format {data.get('format')!r}, expected {FORMAT}")
    ids = data.get("sample_ids")
    if not isinstance(ids, list):
        raise HeldoutFileError(f"{path}: field 'sample_ids' must be a list")
    names = QUANTITIES + ((EXACT,) if EXACT in data else ())
    arrays = []
    for name in names:
        array = np.asarray(data.get(name), dtype=np.float64)
        if array.ndim != 2 or array.shape[0] != len(ids):
            raise HeldoutFileError(f"{path}: field {name!r} must be a [sequences={len(ids)}][steps] list, "
                                   f"got shape {array.shape}")
        arrays.append(array)
    if len({a.shape for a in arrays}) != 1:
        raise HeldoutFileError(f"{path}: fields {', '.join(names)} differ in shape")
    return HeldoutSums(sample_ids=ids, sums=np.stack(arrays), step=data.get("step"))
