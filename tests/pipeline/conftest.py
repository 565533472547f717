"""Shared by the pipeline tests: the sharpened tiny target and one real cache of its hidden states."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

# The tiny-target helpers live with the trainer tests; load them as a plain module.
_spec = importlib.util.spec_from_file_location("trainer_cache_helpers",
                                               Path(__file__).parents[1] / "trainer" / "conftest.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The sharpened tiny Llama target (tests/trainer/conftest.py); read-only."""
    return helpers.make_tiny_target(tiny_llama_dir, tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="session")
def hidden_state_cache(ray_address, target_dir, tmp_path_factory) -> Path:
    """A real `cache build --features aux,last` of the tiny target over 32 conversations of a small word set.

    One build serves every family that reads the target's hidden states: EAGLE-3 reads `aux`, MEDUSA
    and the MLP speculator read `last`. Read-only.
    """
    from pipeline.build import BuildConfig, run_build

    words = "the cat sat on a mat and ran far away from home to see a bird sing about rivers".split()
    rng = np.random.default_rng(0)
    data = tmp_path_factory.mktemp("data") / "chat.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": " ".join(rng.choice(words, 6))},
        {"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(20, 50))))}]}) + "\n"
        for i in range(32)))
    outcome = run_build(BuildConfig(target=str(target_dir), data=str(data),
                                    out=tmp_path_factory.mktemp("hidden-state-caches"), k=8, max_length=256,
                                    shard_size=8, workers=1, threads=1, features=("aux", "last"), progress=False))
    return outcome.path
