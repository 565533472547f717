"""Study report files: each committed atomically, study.json last."""
from __future__ import annotations

import json
import os

import pytest

from eval.study_report import STUDY_JSON, STUDY_MD, TOPK_PLOT, write_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _study(online_tau: float) -> dict:
    """A study with a top-k part only: an online drafter and one k = 8 drafter, over all domains at T = 1."""
    rows = [{"temperature": 1.0, "benchmark": "all", "name": "online", "k": None, "tail": None, "tau": online_tau},
            {"temperature": 1.0, "benchmark": "all", "name": "k8-drop", "k": 8, "tail": "drop", "tau": 1.3,
             "ratio": {"estimate": 1.3 / online_tau, "low": 0.8, "high": 0.95, "confidence": 0.95}}]
    return {"config": {"seeds": [0]}, "topk": {"online": "online", "drafter": "tiny", "rows": rows, "best_k32": {},
                                               "bench": {"k": 3, "limit": 4}, "greedy_mismatches": 0}}


def test_study_json_is_committed_after_the_markdown_and_plots(tmp_path, monkeypatch):
    committed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        real_replace(src, dst)
        committed.append(os.path.basename(dst))

    monkeypatch.setattr(os, "replace", recording_replace)
    write_study(_study(1.5), tmp_path)
    assert committed == [STUDY_MD, TOPK_PLOT, STUDY_JSON]
    assert json.loads((tmp_path / STUDY_JSON).read_text()) == _study(1.5)
    assert (tmp_path / TOPK_PLOT).read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / STUDY_MD).read_text().startswith("# lkspec study")


def test_a_write_that_fails_leaves_the_previous_study_json_and_no_temp_file(tmp_path):
    write_study(_study(1.5), tmp_path)
    finished = (tmp_path / STUDY_JSON).read_bytes()
    (tmp_path / TOPK_PLOT).unlink()
    (tmp_path / TOPK_PLOT).mkdir()  # the plot cannot be committed: the write stops there
    with pytest.raises(OSError):
        write_study(_study(2.0), tmp_path)
    assert (tmp_path / STUDY_JSON).read_bytes() == finished  # still the complete earlier study
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STUDY_MD, TOPK_PLOT, STUDY_JSON])  # no temp file
    (tmp_path / TOPK_PLOT).rmdir()
    write_study(_study(2.0), tmp_path)
    assert json.loads((tmp_path / STUDY_JSON).read_text()) == _study(2.0)
    assert (tmp_path / TOPK_PLOT).read_bytes()[:8] == PNG_MAGIC
