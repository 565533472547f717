"""Benchmark report: per-prompt decoding records -> report.json, report.md and PNG plots.

Every file is committed atomically (cache.atomic), report.json last: a report.json that reads is a
finished report, whatever killed an earlier attempt.
"""
from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

from cache.atomic import atomic_write

BASELINE = "baseline"  # drafter name of the target decoding alone
ALL = "all"  # benchmark name of the rows aggregated over every benchmark
PLOTS = ("tau_by_domain.png", "acceptance_by_position.png")
REPORT_JSON = "report.json"


def summarize(records: list[dict], *, drafters: list[str], k: int) -> dict:
    """Aggregate records (one per prompt × temperature × drafter, baseline included) into rows.

    A record has benchmark, index, temperature, drafter, seconds, output_ids and the decoder stats.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        for bench in (record["benchmark"], ALL):
            groups[(bench, record["temperature"], record["drafter"])].append(record)
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in records))
    temperatures = sorted({r["temperature"] for r in records})

    rows = []
    for bench in benchmarks + [ALL]:
        for temperature in temperatures:
            baseline = groups[(bench, temperature, BASELINE)]
            for drafter in drafters:
                group = groups[(bench, temperature, drafter)]
                if group:
                    rows.append(_row(bench, temperature, drafter, k, group, baseline))
    return {
        "results": [row for row in rows if row["benchmark"] != ALL],
        "overall": [row for row in rows if row["benchmark"] == ALL],
        "prompts": [_prompt_row(r) for r in records],
    }


def _row(bench: str, temperature: float, drafter: str, k: int, group: list[dict], baseline: list[dict]) -> dict:
    from eval.speculative import acceptance_by_position, alpha_by_position, merge_stats

    stats = merge_stats([r["stats"] for r in group])
    seconds = sum(r["seconds"] for r in group)
    tokens_per_s = stats["new_tokens"] / seconds if seconds > 0 else 0.0
    base_tokens = sum(r["stats"]["new_tokens"] for r in baseline)
    base_seconds = sum(r["seconds"] for r in baseline)
    base_tokens_per_s = base_tokens / base_seconds if base_seconds > 0 else None
    mismatches = near_ties = None
    if temperature == 0 and baseline:  # lossless check: greedy outputs must equal the target's, near-ties aside
        greedy = {(r["benchmark"], r["index"]): r["output_ids"] for r in baseline}
        differing = [r for r in group if r["output_ids"] != greedy.get((r["benchmark"], r["index"]))]
        near_ties = sum(bool((r.get("divergence") or {}).get("near_tie")) for r in differing)  # eval.exactness
        mismatches = len(differing) - near_ties
    return {
        "drafter": drafter,
        "benchmark": bench,
        "temperature": temperature,
        "k": k,
        "num_prompts": len(group),
        "tau": stats["tau"],
        "tau_paper": stats["tau_paper"],
        "expected_tau": stats["expected_tau"],
        "acceptance_by_position": acceptance_by_position(stats),
        "alpha_by_position": alpha_by_position(stats),
        "target_forwards": stats["target_forwards"],
        "drafted": stats["drafted"],
        "accepted": stats["accepted"],
        "new_tokens": stats["new_tokens"],
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "baseline_tokens_per_s": base_tokens_per_s,
        "speedup": tokens_per_s / base_tokens_per_s if base_tokens_per_s else None,
        "greedy_mismatches": mismatches,  # differ from target greedy: a lossless-check failure
        "greedy_near_ties": near_ties,  # differ first at a near-tie of the target's logits: not a failure
    }


def _prompt_row(record: dict) -> dict:
    stats = record["stats"]
    return {
        "benchmark": record["benchmark"], "index": record["index"], "id": record["id"],
        "temperature": record["temperature"], "drafter": record["drafter"],
        "greedy_divergence": record.get("divergence"),  # T = 0: eval.exactness.divergence, None when equal
        "prompt_tokens": record.get("prompt_tokens"), "new_tokens": stats["new_tokens"],
        "seconds": record["seconds"], "tau": stats["tau"], "tau_paper": stats.get("tau_paper"),
        "expected_tau": stats["expected_tau"],
        "target_forwards": stats["target_forwards"], "accepted": stats["accepted"],
        "drafted": stats["drafted"], "draft_positions": sum(1 for n in stats["verified_by_position"] if n),
    }


def write_report(report: dict, out: Path) -> None:
    """Write report.md, the PNG plots and, last, report.json into `out`, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.md", markdown(report).encode())
    plot_tau(report["results"], out / PLOTS[0])
    plot_acceptance(report["overall"], out / PLOTS[1])
    atomic_write(out / REPORT_JSON, (json.dumps(report, indent=1, default=str) + "\n").encode())


def read_report(out: Path) -> dict | None:
    """The report in `out`, or None when it has none; an unreadable report.json is None too, with a warning."""
    from trainer.notices import warn

    path = Path(out) / REPORT_JSON
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict):
            raise ValueError(f"a JSON {type(report).__name__}, not an object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # e.g. truncated by a process killed before writes were atomic
        warn(f"{path} is unreadable ({type(exc).__name__}: {exc}): the benchmark is not finished, running it again")
        return None
    return report


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """τ by domain × drafter × temperature, speed-up over the target alone, and acceptance per position."""
    rows = report["results"] + report["overall"]
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    columns = list(dict.fromkeys((r["drafter"], r["temperature"]) for r in rows))
    by_key = {(r["benchmark"], r["drafter"], r["temperature"]): r for r in rows}
    k = rows[0]["k"] if rows else "?"
    lines = [f"# Speculative decoding benchmark (K = {k})", ""]
    config = report.get("config", {})
    if config:
        lines += [f"Target `{config.get('target')}`, max {config.get('max_new_tokens')} new tokens, "
                  f"{config.get('dtype')}, {config.get('workers')} worker(s) × "
                  f"{config.get('threads_per_worker')} thread(s).", ""]

    header = "| benchmark | " + " | ".join(f"{d} T={t:g}" for d, t in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    for title, cell in (
        ("τ: tokens per target forward / as the paper computes it, K·accepted/drafted + 1; "
         "expected τ from α in parentheses",
         lambda r: f"{_fmt(r['tau'])} / {_fmt(r.get('tau_paper'))} ({_fmt(r['expected_tau'])})"),
        ("Speed-up over the target alone (tokens/s; same run, same cores)",
         lambda r: f"{_fmt(r['speedup'])}× ({_fmt(r['tokens_per_s'], 1)} vs {_fmt(r['baseline_tokens_per_s'], 1)})"),
    ):
        lines += [f"## {title}", "", header, rule]
        for bench in benchmarks:
            cells = [cell(by_key[(bench, d, t)]) if (bench, d, t) in by_key else "–" for d, t in columns]
            lines.append(f"| {bench} (n={_num_prompts(by_key, bench)}) | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Acceptance by draft position (all benchmarks, conditional on reaching it)", "",
              "| drafter | T | " + " | ".join(str(i + 1) for i in range(int(k) if k != "?" else 0)) + " |",
              "|---|---|" + "---|" * (int(k) if k != "?" else 0)]
    for row in report["overall"]:
        lines.append(f"| {row['drafter']} | {row['temperature']:g} | "
                     + " | ".join(_fmt(a) for a in row["acceptance_by_position"]) + " |")
    mismatched = [r for r in report["overall"] if r.get("greedy_mismatches")]
    tied = [r for r in report["overall"] if r.get("greedy_near_ties")]
    if mismatched:
        verdict = "; ".join(f"{r['drafter']}: {r['greedy_mismatches']} prompt(s) differ from target greedy"
                            for r in mismatched)
    elif tied:
        verdict = "passed: outputs differ from the target's greedy output only at near-ties."
    else:
        verdict = "every output equals the target's greedy output."
    lines += ["", f"Lossless check at T = 0: {verdict}"]
    if tied:
        lines += ["", "Near-ties (not failures): " + "; ".join(
            f"{r['drafter']}: {r['greedy_near_ties']} prompt(s) differ first where the target's top-2 logits are "
            f"within two {config.get('dtype', 'dtype')} rounding steps (each rounds by up to one)" for r in tied) + "."]
    lines.append("")
    return "\n".join(lines)


def _num_prompts(by_key: dict, bench: str) -> int:
    return max((r["num_prompts"] for (b, _, _), r in by_key.items() if b == bench), default=0)


def plot_tau(results: list[dict], path: Path) -> None:
    """Grouped bars: τ per benchmark, one bar per drafter × temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(r["benchmark"] for r in results))
    series = list(dict.fromkeys((r["drafter"], r["temperature"]) for r in results))
    by_key = {(r["benchmark"], r["drafter"], r["temperature"]): r["tau"] for r in results}
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(benchmarks) + 0.4 * len(series)), 3.6))
    for i, (drafter, temperature) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(benchmarks))]
        ax.bar(xs, [by_key.get((b, drafter, temperature), 0) for b in benchmarks], width,
               label=f"{drafter} T={temperature:g}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(benchmarks)), benchmarks)
    ax.set_ylabel("τ (tokens per target forward)")
    ax.set_title("Acceptance length by domain")
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot_acceptance(overall: list[dict], path: Path) -> None:
    """Acceptance rate at each draft position (conditional on reaching it), one line per drafter × T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row in overall:
        rates = row["acceptance_by_position"]
        points = [(i + 1, a) for i, a in enumerate(rates) if a is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{row['drafter']} T={row['temperature']:g}")
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance (given reached)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Acceptance by draft position")
    ax.legend(fontsize=8)
    save_png(fig, path)


def save_png(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write atomically (cache.atomic) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(Path(path), png.getvalue())
