"""Report aggregation (τ, acceptance, speed-up, lossless check) and the files it writes."""
from __future__ import annotations

import json

import pytest

from eval.report import PLOTS, markdown, read_report, summarize, write_report
from eval.speculative import derive_taus, new_stats


def record(bench, index, drafter, temperature, *, tokens, forwards, seconds, accepted_by, reached_by,
           alpha_sum, output):
    stats = new_stats(len(reached_by))
    stats.update(new_tokens=tokens, target_forwards=forwards, accepted=sum(accepted_by),
                 drafted=forwards * len(reached_by), accepted_by_position=accepted_by,
                 reached_by_position=reached_by, alpha_sum_by_position=alpha_sum,
                 verified_by_position=[forwards] * len(reached_by))
    derive_taus(stats)
    return {"benchmark": bench, "index": index, "id": str(index), "drafter": drafter,
            "temperature": temperature, "seconds": seconds, "output_ids": output, "stats": stats}


def baseline(bench, index, temperature, *, tokens, seconds, output):
    stats = new_stats(0)
    stats.update(new_tokens=tokens, target_forwards=tokens)
    derive_taus(stats)
    return {"benchmark": bench, "index": index, "id": str(index), "drafter": "baseline",
            "temperature": temperature, "seconds": seconds, "output_ids": output, "stats": stats}


@pytest.fixture
def records():
    return [
        baseline("gsm8k", 0, 0.0, tokens=10, seconds=1.0, output=[1] * 10),
        baseline("gsm8k", 1, 0.0, tokens=10, seconds=1.0, output=[2] * 10),
        record("gsm8k", 0, "lk", 0.0, tokens=10, forwards=4, seconds=0.5, accepted_by=[4, 2],
               reached_by=[4, 4], alpha_sum=[4.0, 2.0], output=[1] * 10),
        record("gsm8k", 1, "lk", 0.0, tokens=10, forwards=6, seconds=0.5, accepted_by=[3, 1],
               reached_by=[6, 3], alpha_sum=[3.0, 2.0], output=[2] * 9 + [3]),  # differs: lossless violated
        baseline("mt-bench", 0, 0.0, tokens=8, seconds=2.0, output=[5] * 8),
        record("mt-bench", 0, "lk", 0.0, tokens=8, forwards=8, seconds=4.0, accepted_by=[0, 0],
               reached_by=[8, 0], alpha_sum=[0.0, 0.0], output=[5] * 8),
    ]


def test_rows_aggregate_per_benchmark_and_overall(records):
    report = summarize(records, drafters=["lk"], k=2)
    gsm8k = next(r for r in report["results"] if r["benchmark"] == "gsm8k")
    assert gsm8k["num_prompts"] == 2 and gsm8k["k"] == 2
    assert gsm8k["tau"] == pytest.approx(20 / 10)
    assert gsm8k["acceptance_by_position"] == pytest.approx([7 / 10, 3 / 7])
    assert gsm8k["alpha_by_position"] == pytest.approx([7 / 10, 4 / 10])
    assert gsm8k["expected_tau"] == pytest.approx(1 + 0.7 + 0.7 * 0.4)
    assert gsm8k["tau_paper"] == pytest.approx(2 * (6 + 4) / (4 * 2 + 6 * 2) + 1)  # K·accepted/drafted + 1
    assert gsm8k["tokens_per_s"] == pytest.approx(20.0) and gsm8k["baseline_tokens_per_s"] == pytest.approx(10.0)
    assert gsm8k["speedup"] == pytest.approx(2.0)
    assert gsm8k["greedy_mismatches"] == 1
    mt_bench = next(r for r in report["results"] if r["benchmark"] == "mt-bench")
    assert mt_bench["acceptance_by_position"] == [0.0, None]  # position 2 never reached
    assert mt_bench["speedup"] == pytest.approx(0.5) and mt_bench["greedy_mismatches"] == 0
    (overall,) = report["overall"]
    assert overall["benchmark"] == "all" and overall["num_prompts"] == 3
    assert overall["tau"] == pytest.approx(28 / 18)
    assert overall["tau_paper"] == pytest.approx(2 * 10 / (20 + 16) + 1)
    assert len(report["prompts"]) == len(records)


def test_report_files(records, tmp_path):
    report = summarize(records, drafters=["lk"], k=2)
    report["config"] = {"target": "smollm2-135m", "max_new_tokens": 10, "dtype": "fp32", "workers": 1,
                        "threads_per_worker": 2}
    write_report(report, tmp_path)
    loaded = json.loads((tmp_path / "report.json").read_text())
    required = {"drafter", "benchmark", "temperature", "k", "tau", "tau_paper", "expected_tau", "acceptance_by_position",
                "tokens_per_s", "baseline_tokens_per_s", "speedup", "num_prompts"}
    assert all(required <= set(row) for row in loaded["results"])
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.md").read_text()
    assert "| gsm8k (n=2) | 2.00 / 2.00 (1.98) |" in text
    assert "| mt-bench (n=1) | 1.00 / 1.00 (1.00) |" in text
    assert "| mt-bench (n=1) | 0.50× (2.0 vs 4.0) |" in text
    assert "| lk | 0 | 0.39 | 0.43 |" in text
    assert "lk: 1 prompt(s) differ from target greedy" in text


def test_report_json_is_committed_last_so_an_unfinished_report_has_none(records, tmp_path):
    report = summarize(records, drafters=["lk"], k=2)
    (tmp_path / PLOTS[1]).mkdir()  # the last plot cannot be written: the report stops there
    with pytest.raises(OSError):
        write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.md", *PLOTS])  # no report.json, no temp file
    assert read_report(tmp_path) is None
    (tmp_path / PLOTS[1]).rmdir()
    write_report(report, tmp_path)
    assert read_report(tmp_path) == json.loads(json.dumps(report, default=str))


def test_an_unreadable_report_is_not_finished_and_says_which_file(records, tmp_path, capsys):
    write_report(summarize(records, drafters=["lk"], k=2), tmp_path)
    whole = (tmp_path / "report.json").read_bytes()
    for broken in (whole[:len(whole) // 2], b"[1, 2]\n", b""):  # killed mid-write (before writes were atomic), ...
        (tmp_path / "report.json").write_bytes(broken)
        assert read_report(tmp_path) is None
        err = capsys.readouterr().err
        assert err.startswith(f"lkspec: warning: {tmp_path / 'report.json'} is unreadable (") and err.count("\n") == 1
        assert err.endswith("the benchmark is not finished, running it again\n")
    (tmp_path / "report.json").unlink()
    assert read_report(tmp_path) is None and capsys.readouterr().err == ""  # no report yet: nothing to say


def test_a_difference_at_a_near_tie_is_counted_apart_and_does_not_fail(records):
    records[3]["divergence"] = {"position": 9, "greedy_token": 2, "output_token": 3, "gap": 0.0, "step": 2.0 ** -4,
                                "near_tie": True}  # as eval.exactness.divergence reports it
    report = summarize(records, drafters=["lk"], k=2)
    report["config"] = {"dtype": "bf16"}
    (overall,) = report["overall"]
    assert (overall["greedy_mismatches"], overall["greedy_near_ties"]) == (0, 1)
    assert report["prompts"][3]["greedy_divergence"]["position"] == 9
    text = markdown(report)
    assert "Lossless check at T = 0: passed: outputs differ from the target's greedy output only at near-ties" in text
    assert "lk: 1 prompt(s) differ first where the target's top-2 logits are within two bf16 rounding steps" in text
    records[3]["divergence"]["near_tie"] = False
    (overall,) = summarize(records, drafters=["lk"], k=2)["overall"]
    assert (overall["greedy_mismatches"], overall["greedy_near_ties"]) == (1, 0)


def test_markdown_with_every_output_lossless(records):
    records[3]["output_ids"] = [2] * 10
    text = markdown(summarize(records, drafters=["lk"], k=2))
    assert "every output equals the target's greedy output" in text
