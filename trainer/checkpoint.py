"""DeepSpeed checkpoints with each worker's data position and RNG, and the Hugging Face export.

Layout under <run>/checkpoints/: one directory per tag (`step-00000100`) holding DeepSpeed's files
plus `worker-00000.pt` ... (data position and RNG state of each rank), and DeepSpeed's `latest`
file naming the newest complete tag (written last, so a killed save is never resumed from).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.data import DataPosition

CHECKPOINTS_DIR = "checkpoints"


def step_tag(step: int) -> str:
    """Checkpoint tag of an optimizer step."""
    return f"step-{step:08d}"


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint tag, or None."""
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (Path(checkpoint_dir) / tag).is_dir() else None


def latest_step(checkpoint_dir: Path) -> int:
    """The optimizer step of the newest complete checkpoint (what a resumed run continues from), 0 if none."""
    tag = latest_tag(checkpoint_dir)
    return int(tag.rsplit("-", 1)[1]) if tag else 0


@dataclass
class Restored:
    """What a resumed worker continues from."""

    step: int
    position: DataPosition
    client_state: dict[str, Any]


def save_checkpoint(engine, checkpoint_dir: Path, *, step: int, position: DataPosition,
                    client_state: dict[str, Any], keep: int) -> None:
    """Collective: every rank saves its share; older tags beyond `keep` are removed."""
    rank = dist.get_rank()
    tag = step_tag(step)
    (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
    worker_state = {"position": position.to_dict(), "rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        worker_state["rng_cuda"] = torch.cuda.get_rng_state()
    torch.save(worker_state, checkpoint_dir / tag / f"worker-{rank:05d}.pt")
    dist.barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={**client_state, "step": step})
    if rank == 0:
        tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()


def _deepspeed_safe_globals() -> list:
    """The plain-data DeepSpeed classes its checkpoints pickle (allowed under weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str, map_location=None):
    """torch.load(weights_only=True) for DeepSpeed checkpoint files: tensors and plain data, never code."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint(engine, checkpoint_dir: Path) -> Restored | None:
    """Collective: restore model, optimizer, scheduler, this rank's data position and RNG; None if none saved."""
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        return None
    rank = dist.get_rank()
    # DeepSpeed's own loader unpickles arbitrary objects (weights_only=False): use the restricted one.
    engine.checkpoint_engine.load = weights_only_load
    path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}")
    worker_file = checkpoint_dir / tag / f"worker-{rank:05d}.pt"
    if not worker_file.is_file():
        raise RuntimeError(f"{worker_file} is missing: the checkpoint was written by fewer workers")
    worker_state = torch.load(worker_file, map_location="cpu", weights_only=True)
    torch.set_rng_state(worker_state["rng_cpu"])
    if "rng_cuda" in worker_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(worker_state["rng_cuda"])
    return Restored(step=int(client_state["step"]), position=DataPosition(**worker_state["position"]),
                    client_state=client_state)


@contextlib.contextmanager
def full_parameters(engine):
    """Collective context in which every rank's module holds full (un-partitioned) parameters."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def export_drafter(engine, out_dir: Path, tokenizer_dir: str | None) -> None:
    """Collective: rank 0 writes the drafter's Hugging Face export to out_dir (replaced atomically)."""
    out_dir = Path(out_dir)
    with full_parameters(engine):
        if dist.get_rank() == 0:
            tmp = out_dir.with_name(f".{out_dir.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            engine.module.export(tmp, tokenizer_dir)
            old = out_dir.with_name(f".{out_dir.name}.old")
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
