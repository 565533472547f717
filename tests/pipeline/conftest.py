"""Shared by the pipeline tests: the sharpened tiny target."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
