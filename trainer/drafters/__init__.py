"""The drafter registry: one `Family` per module or folder, looked up by name, `--drafter` value, directory or model.

    family("medusa")              by name (DrafterSpec.kind, run.json's drafter.kind)
    family_for("mlp:stages=4")    by a `--drafter` value (presets and model directories: independent)
    family_of_dir(path)           by an export directory (its config.json's architectures)
    family_of_model(model)        by a decoding model (what eval.speculative.speculative_generate drafts with)
    build_drafter(spec)           the trainable module of a resolved DrafterSpec

Families: independent.py (Hugging Face causal LMs), eagle3/ (EAGLE-3), medusa.py (MEDUSA-1 heads),
mlp.py (the MLP speculator). The interface they implement is trainer.drafters.base.Family.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from trainer.drafters import eagle3, independent, medusa, mlp
from trainer.drafters.base import (DraftStep, Drafter, DrafterError, DrafterMismatchError, DrafterSpec,
                                   DraftVocabulary, Family, SpecContext, draft_vocabulary, load_embeddings,
                                   load_input_embeddings, option_value)
from trainer.drafters.independent import ARCH_KEYS, PRESETS, IndependentDrafter, parse_arch_overrides, \
    resolve_drafter_spec

# Looked up in this order: `independent` last, it claims every `--drafter` value and directory the others do not.
FAMILIES: tuple[Family, ...] = (eagle3.FAMILY, medusa.FAMILY, mlp.FAMILY, independent.FAMILY)

__all__ = ["ARCH_KEYS", "FAMILIES", "PRESETS", "DraftStep", "DraftVocabulary", "Drafter", "DrafterError",
           "DrafterMismatchError", "DrafterSpec", "Family", "IndependentDrafter", "SpecContext", "build_drafter",
           "draft_vocabulary", "family", "family_for", "family_of_dir", "family_of_model", "load_embeddings",
           "load_input_embeddings", "option_value", "parse_arch_overrides", "resolve_drafter_spec"]


def family(name: str) -> Family:
    """The family registered under `name` (DrafterError listing the known ones otherwise)."""
    for candidate in FAMILIES:
        if candidate.name == name:
            return candidate
    raise DrafterError(f"unknown drafter kind {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_for(drafter: str) -> Family:
    """The family a `--drafter` value names (`eagle3[:..]`, `medusa[:..]`, `mlp[:..]`; anything else: independent)."""
    return next(f for f in FAMILIES if f.matches(drafter))


def family_of_dir(path: str | Path) -> Family:
    """The family whose export `path` holds (any other directory with config.json: a Hugging Face causal LM)."""
    path = Path(path)
    found = next((f for f in FAMILIES if f.is_export(path)), None)
    if found is None:
        raise DrafterError(f"{path} holds no drafter: expected an export (config.json + weights) of one of "
                           f"{', '.join(f.name for f in FAMILIES)}")
    return found


def family_of_model(model: nn.Module) -> Family:
    """The family of a decoding model (an Eagle3Model, MedusaModel, MLPSpeculator or any causal LM)."""
    return next(f for f in FAMILIES if f.owns(model))


def build_drafter(spec: DrafterSpec) -> Drafter:
    """Instantiate the drafter in fp32 on CPU (weights from the directory, or initialized from torch's RNG)."""
    return family(spec.kind).build(spec)
