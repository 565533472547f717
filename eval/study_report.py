"""Study report: bench reports (per-prompt records) -> τ ratios with confidence intervals, tables, plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eval.report import ALL, BASELINE
from eval.stats import paired_ratio_bootstrap, pooled_tau, t_interval

PLOTS = ("reproduction_ratios.png", "topk_tau.png")


def _prompt_arrays(report: dict, drafters: list[list[str]], temperature: float,
                   benchmark: str) -> tuple[list[tuple], np.ndarray, np.ndarray]:
    """tokens and forwards [group, seed, prompt] for groups of drafter names (one row per seed).

    Prompts are every (benchmark, index) decoded at `temperature` (one benchmark, or all for ALL).
    """
    rows = {(r["drafter"], r["benchmark"], r["index"]): r for r in report["prompts"]
            if r["temperature"] == temperature and r["drafter"] != BASELINE}
    prompts = sorted({(b, i) for (_, b, i) in rows if benchmark in (ALL, b)},
                     key=lambda p: (_bench_order(report)[p[0]], p[1]))
    missing = [(d, p) for group in drafters for d in group for p in prompts if (d, *p) not in rows]
    if missing:
        drafter, prompt = missing[0]
        raise ValueError(f"bench report lacks decodes, e.g. drafter {drafter} on {prompt} at T={temperature}")
    tokens = np.array([[[rows[(d, *p)]["new_tokens"] for p in prompts] for d in group] for group in drafters])
    forwards = np.array([[[rows[(d, *p)]["target_forwards"] for p in prompts] for d in group] for group in drafters])
    return prompts, tokens, forwards


def _bench_order(report: dict) -> dict[str, int]:
    return {name: i for i, name in enumerate(dict.fromkeys(r["benchmark"] for r in report["prompts"]))}


def _domains(report: dict) -> list[str]:
    return list(_bench_order(report)) + [ALL]


def _temperatures(report: dict) -> list[float]:
    return sorted({r["temperature"] for r in report["prompts"]})


def _greedy_mismatches(report: dict) -> int:
    return sum(r.get("greedy_mismatches") or 0 for r in report["overall"])


def summarize_reproduction(report: dict, *, runs: list[dict], losses: list[str], seeds: list[int], reference: str,
                           resamples: int, confidence: float) -> dict:
    """τ per loss and τ(loss) ÷ τ(reference) per domain × temperature, paired over seeds and prompts."""
    names = {(run["loss"], run["seed"]): run["name"] for run in runs}
    groups = [[names[(loss, seed)] for seed in seeds] for loss in losses]
    rows = []
    for temperature in _temperatures(report):
        for domain in _domains(report):
            prompts, tokens, forwards = _prompt_arrays(report, groups, temperature, domain)
            ref = losses.index(reference)
            ref_by_seed = _seed_taus(tokens[ref], forwards[ref])
            for i, loss in enumerate(losses):
                row = {"temperature": temperature, "benchmark": domain, "loss": loss, "num_prompts": len(prompts),
                       "tau": pooled_tau(tokens[i], forwards[i]), "tau_by_seed": _seed_taus(tokens[i], forwards[i])}
                if loss != reference:
                    row["ratio"] = paired_ratio_bootstrap(tokens[ref], forwards[ref], tokens[i], forwards[i],
                                                          resamples=resamples, confidence=confidence).to_dict()
                    row["ratio_by_seed"] = [a / b for a, b in zip(row["tau_by_seed"], ref_by_seed)]
                    row["seed_t_interval"] = (t_interval(np.array(row["ratio_by_seed"]), confidence).to_dict()
                                              if len(seeds) > 1 else None)
                rows.append(row)
    heldout = {}
    for loss in losses:
        values = [run["heldout_tau"] for run in runs if run["loss"] == loss and run["heldout_tau"] is not None]
        alphas = [run["heldout_alpha"] for run in runs if run["loss"] == loss and run["heldout_alpha"] is not None]
        heldout[loss] = {"tau_mean": float(np.mean(values)) if values else None,
                         "tau_sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                         "alpha_mean": float(np.mean(alphas)) if alphas else None}
    return {"reference": reference, "losses": losses, "seeds": seeds, "rows": rows, "runs": runs,
            "heldout": heldout, "greedy_mismatches": _greedy_mismatches(report),
            "bench": report.get("config", {})}


def _seed_taus(tokens: np.ndarray, forwards: np.ndarray) -> list[float]:
    """Pooled τ of each row (seed) of [seeds, prompts] arrays."""
    return [pooled_tau(tokens[s], forwards[s]) for s in range(tokens.shape[0])]


def summarize_topk(report: dict, *, runs: list[dict], resamples: int, confidence: float) -> dict:
    """τ of each top-k / tail drafter and of the online one; τ ÷ τ(online) with a paired prompt bootstrap."""
    online = next(run for run in runs if run["target_source"] == "online")
    rows = []
    for temperature in _temperatures(report):
        for domain in _domains(report):
            prompts, tokens, forwards = _prompt_arrays(report, [[run["name"]] for run in runs], temperature, domain)
            ref = runs.index(online)
            for i, run in enumerate(runs):
                row = {"temperature": temperature, "benchmark": domain, "name": run["name"], "k": run["k"],
                       "tail": None if run is online else run["tail"], "num_prompts": len(prompts),
                       "tau": pooled_tau(tokens[i], forwards[i])}
                if run is not online:
                    row["ratio"] = paired_ratio_bootstrap(tokens[ref], forwards[ref], tokens[i], forwards[i],
                                                          resamples=resamples, confidence=confidence).to_dict()
                rows.append(row)
    best = {}
    for temperature in _temperatures(report):
        candidates = [r for r in rows if r["temperature"] == temperature and r["benchmark"] == ALL and r["k"] == 32]
        if candidates:
            top = max(candidates, key=lambda r: r["tau"])
            best[f"{temperature:g}"] = {"name": top["name"], "tail": top["tail"], "ratio": top["ratio"],
                                        "meets_goal": top["ratio"]["estimate"] >= 0.99}
    return {"online": online["name"], "rows": rows, "runs": runs, "best_k32": best,
            "greedy_mismatches": _greedy_mismatches(report), "bench": report.get("config", {})}


# ------------------------------------------------------------------------------- writing
def write_study(study: dict, out: Path) -> None:
    """study.json, study.md and the plots of the parts present."""
    out = Path(out)
    (out / "study.json").write_text(json.dumps(study, indent=1, default=str) + "\n")
    (out / "study.md").write_text(markdown(study))
    if "reproduction" in study:
        plot_reproduction(study["reproduction"], out / PLOTS[0])
    if "topk" in study:
        plot_topk(study["topk"], out / PLOTS[1])


def _ci(interval: dict | None) -> str:
    if not interval:
        return "–"
    return f"{interval['estimate']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(study: dict) -> str:
    """Tables of both parts."""
    lines = ["# lkspec study", ""]
    if "reproduction" in study:
        lines += _reproduction_markdown(study["reproduction"])
    if "topk" in study:
        lines += _topk_markdown(study["topk"])
    if study.get("timings"):
        lines += ["Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in study["timings"].items()), ""]
    return "\n".join(lines)


def _reproduction_markdown(part: dict) -> list[str]:
    rows, reference = part["rows"], part["reference"]
    others = [loss for loss in part["losses"] if loss != reference]
    confidence = next((r["ratio"]["confidence"] for r in rows if "ratio" in r), 0.95)
    bench = part["bench"]
    lines = ["## LK vs KL (reproduction)", "",
             f"{len(part['seeds'])} seeds × {len(part['losses'])} losses, one cache; K = {bench.get('k')}, "
             f"{bench.get('limit')} prompts per domain, {bench.get('max_new_tokens')} new tokens. "
             f"Ratios: pooled τ(loss) ÷ τ({reference}); brackets: {confidence:.0%} paired bootstrap over seeds "
             f"and prompts; last columns: {confidence:.0%} t-interval over the per-seed ratios.", "",
             "| T | domain | " + " | ".join(f"τ {loss}" for loss in part["losses"]) + " | "
             + " | ".join(f"{loss} ÷ {reference} [bootstrap]" for loss in others) + " | "
             + " | ".join(f"{loss} ÷ {reference} [t, seeds]" for loss in others) + " |",
             "|---|---|" + "---|" * (len(part["losses"]) + 2 * len(others))]
    keys = list(dict.fromkeys((r["temperature"], r["benchmark"]) for r in rows))
    by = {(r["temperature"], r["benchmark"], r["loss"]): r for r in rows}
    for temperature, domain in keys:
        cells = [_f(by[(temperature, domain, loss)]["tau"]) for loss in part["losses"]]
        cells += [_ci(by[(temperature, domain, loss)]["ratio"]) for loss in others]
        cells += [_ci(by[(temperature, domain, loss)]["seed_t_interval"]) for loss in others]
        n = by[(temperature, domain, reference)]["num_prompts"]
        lines.append(f"| {temperature:g} | {domain} (n={n}) | " + " | ".join(cells) + " |")
    lines += ["", "Held-out expected τ from training (cache targets, tail bucket), mean ± sd over seeds:", "",
              "| loss | held-out α | held-out expected τ |", "|---|---|---|"]
    for loss, h in part["heldout"].items():
        lines.append(f"| {loss} | {_f(h['alpha_mean'])} | {_f(h['tau_mean'])} ± {_f(h['tau_sd'])} |")
    lines += ["", f"Lossless check at T = 0: {part['greedy_mismatches']} output(s) differ from target greedy.", ""]
    return lines


def _topk_markdown(part: dict) -> list[str]:
    rows = part["rows"]
    bench = part["bench"]
    domains = list(dict.fromkeys(r["benchmark"] for r in rows))
    lines = ["## Top-k fidelity", "",
             f"Reference: `{part['online']}` (trained on the target's full distribution). K = {bench.get('k')}, "
             f"{bench.get('limit')} prompts per domain. Ratio: τ ÷ τ(online) over all domains, paired prompt "
             "bootstrap.", ""]
    for temperature in sorted({r["temperature"] for r in rows}):
        lines += [f"T = {temperature:g}:", "",
                  "| drafter | k | tail | " + " | ".join(f"τ {d}" for d in domains) + " | ÷ online (all) |",
                  "|---|---|---|" + "---|" * (len(domains) + 1)]
        names = list(dict.fromkeys(r["name"] for r in rows))
        by = {(r["name"], r["benchmark"]): r for r in rows if r["temperature"] == temperature}
        for name in names:
            first = by[(name, domains[0])]
            cells = [_f(by[(name, d)]["tau"]) for d in domains]
            lines.append(f"| {name} | {first['k'] or 'full'} | {first['tail'] or '–'} | " + " | ".join(cells)
                         + f" | {_ci(by[(name, domains[-1])].get('ratio'))} |")
        best = part["best_k32"].get(f"{temperature:g}")
        if best:
            verdict = "meets" if best["meets_goal"] else "misses"
            lines += ["", f"Best k = 32 setting at T = {temperature:g}: tail {best['tail']}, τ ÷ τ(online) = "
                      f"{_ci(best['ratio'])}: the point estimate {verdict} the ≥ 0.99 goal."]
        lines.append("")
    return lines


def plot_reproduction(part: dict, path: Path) -> None:
    """τ(loss) ÷ τ(reference) per domain with bootstrap intervals, one panel per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in part["rows"] if "ratio" in r]
    temperatures = sorted({r["temperature"] for r in rows})
    domains = list(dict.fromkeys(r["benchmark"] for r in rows))
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.2 * len(temperatures), 3.4), sharey=True, squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        for j, loss in enumerate(losses):
            sel = {r["benchmark"]: r["ratio"] for r in rows if r["temperature"] == temperature and r["loss"] == loss}
            xs = np.arange(len(domains)) + (j - (len(losses) - 1) / 2) * 0.2
            est = np.array([sel[d]["estimate"] for d in domains])
            err = np.array([[est[i] - sel[d]["low"], sel[d]["high"] - est[i]] for i, d in enumerate(domains)]).T
            ax.errorbar(xs, est, yerr=err, fmt="o", capsize=3, label=f"{loss} ÷ {part['reference']}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(domains)), domains, fontsize=8)
        ax.set_title(f"T = {temperature:g}")
    axes[0][0].set_ylabel("τ ratio (bootstrap CI)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_topk(part: dict, path: Path) -> None:
    """τ over all domains against k, one line per tail mode, the online drafter as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in part["rows"] if r["benchmark"] == ALL]
    temperatures = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.2 * len(temperatures), 3.4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        sel = [r for r in rows if r["temperature"] == temperature]
        for tail in dict.fromkeys(r["tail"] for r in sel if r["tail"]):
            points = sorted((r["k"], r["tau"]) for r in sel if r["tail"] == tail)
            ax.plot(*zip(*points), marker="o", label=f"top-k, tail {tail}")
        online = next(r for r in sel if r["tail"] is None)
        ax.axhline(online["tau"], color="black", lw=1, ls="--", label="full distribution (online)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k cached")
        ax.set_ylabel("τ (all domains)")
        ax.set_title(f"T = {temperature:g}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
