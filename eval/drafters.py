"""One loader for every drafter kind: a run directory or an export of any family, ready to decode with."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from trainer.drafters import DrafterError, family_of_dir


def load_drafter(path: str | Path, target: nn.Module) -> nn.Module:
    """The drafter in `path` (a run directory's model/, or an export) on the target's device and dtype, checked
    against the target; what eval.speculative.speculative_generate drafts with."""
    path = Path(path).expanduser()
    if (path / "run.json").is_file():
        path = path / "model"
    if not (path / "config.json").is_file():
        raise DrafterError(f"{path} holds no drafter: expected a training run directory (run.json + model/) "
                           "or an exported drafter directory (config.json + weights)")
    family = family_of_dir(path)
    model = family.load(path, target.dtype).to(target.device).eval()
    family.check_target(model.config, target.config)
    return model
