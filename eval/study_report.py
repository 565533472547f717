"""Study report: held-out α sums and bench reports -> α and τ ratios with confidence intervals, tables, plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cache.atomic import atomic_write
from eval.report import ALL, BASELINE, save_png
from eval.stats import Interval, paired_ratio_bootstrap, paired_tau_bootstrap, pooled_tau, t_interval
from trainer.heldout import EXACT, QUANTITIES, HeldoutSums
from trainer.losses import expected_tau

STUDY_JSON, STUDY_MD = "study.json", "study.md"
HELDOUT_PLOT, TOPK_PLOT = "heldout_alpha.png", "topk_tau.png"
# α measure -> HeldoutSums quantity: the two tail bounds, and the exact α where every run scored it.
# study.json keeps them under "tails" (the name from before the exact α).
ALPHA_MEASURES = {"drop": "alpha_drop_sum", "bucket": "alpha_bucket_sum", "exact": EXACT}
MEASURE_TITLES = {"drop": "Tail dropped (lower bound of α)", "bucket": "Tail as a bucket (upper bound of α)",
                  "exact": "Exact α (against the target's full distribution)"}
MEASURE_LABELS = {"drop": "tail dropped", "bucket": "tail as a bucket", "exact": "exact α"}
# What the study must resolve (issue 11): KL drafters accept enough to leave room for an effect, and
# the α-ratio interval is narrow enough to see a 3% one.
ALPHA_GOAL, HALF_WIDTH_GOAL = 0.3, 0.015


def tau_plot_name(label: str) -> str:
    """File name of one family's τ-ratio plot."""
    return f"tau_ratios-{label}.png"


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


def _greedy_check(report: dict) -> dict[str, int]:
    """T = 0 outputs that differ from target greedy: failures, and near-ties of the target's top-2 (eval.report)."""
    return {key: sum(r.get(key) or 0 for r in report["overall"]) for key in ("greedy_mismatches", "greedy_near_ties")}


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
                       "tau": pooled_tau(tokens[i], forwards[i]), "tau_by_seed": _seed_taus(tokens[i], forwards[i]),
                       "tau_paper": _paper_tau(report, groups[i], prompts, temperature)}
                if loss != reference:
                    row["ratio"] = paired_ratio_bootstrap(tokens[ref], forwards[ref], tokens[i], forwards[i],
                                                          resamples=resamples, confidence=confidence).to_dict()
                    row["ratio_by_seed"] = [a / b for a, b in zip(row["tau_by_seed"], ref_by_seed)]
                    row["seed_t_interval"] = (t_interval(np.array(row["ratio_by_seed"]), confidence).to_dict()
                                              if len(seeds) > 1 else None)
                rows.append(row)
    return {"reference": reference, "losses": losses, "seeds": seeds, "rows": rows, "runs": runs,
            **_greedy_check(report), "bench": report.get("config", {})}


def _paper_tau(report: dict, drafters: list[str], prompts: list[tuple], temperature: float) -> float | None:
    """τ as the paper computes it, K·accepted/drafted + 1, pooled over the drafters' decodes of `prompts`."""
    wanted = {(d, *p) for d in drafters for p in prompts}
    rows = [r for r in report["prompts"] if r["temperature"] == temperature
            and (r["drafter"], r["benchmark"], r["index"]) in wanted]
    drafted = sum(r.get("drafted") or 0 for r in rows)
    k = max((r.get("draft_positions") or 0 for r in rows), default=0)  # positions verified (eval.speculative.paper_tau)
    return k * sum(r["accepted"] for r in rows) / drafted + 1 if drafted else None


# ------------------------------------------------------------------------------- held-out α (primary)
def summarize_heldout(heldout: dict[str, list[HeldoutSums]], *, reference: str, draft_len: int, resamples: int,
                      confidence: float) -> dict:
    """Held-out α per draft step and loss under both tail modes (and exact, where every run scored it);
    α(loss) ÷ α(reference) and E[τ](loss) ÷ E[τ](reference), each with a percentile interval from resampling
    seeds and held-out sequences jointly.

    `heldout[loss]` holds one HeldoutSums per seed, in the same seed order for every loss.
    """
    first = heldout[reference][0]
    for loss, runs in heldout.items():
        if len(runs) != len(heldout[reference]):
            raise ValueError(f"{len(runs)} {loss} run(s) but {len(heldout[reference])} {reference} run(s)")
        for seed, sums in enumerate(runs):
            if sums.sample_ids != first.sample_ids or sums.sums.shape[1:] != first.sums.shape[1:]:
                raise ValueError(f"the {loss} run #{seed} scored other held-out sequences or draft steps than the "
                                 f"{reference} run #0: the paired ratio needs the same ones")
    scored = set.intersection(*(set(sums.quantities) for runs in heldout.values() for sums in runs))
    quantities = [q for q in QUANTITIES + (EXACT,) if q in scored]
    # [quantity, seed, sequence, step] per loss
    arrays = {loss: np.stack([sums.sums[[sums.quantities.index(q) for q in quantities]] for sums in runs], axis=1)
              for loss, runs in heldout.items()}
    positions = quantities.index("positions")
    tails = {}
    for tail, quantity in ALPHA_MEASURES.items():
        if quantity not in quantities:
            continue
        q = quantities.index(quantity)
        ref = arrays[reference]
        rows = []
        for loss, a in arrays.items():
            alpha = a[q].sum(axis=(0, 1)) / np.maximum(a[positions].sum(axis=(0, 1)), 1.0)  # [steps]
            by_seed = a[q].sum(axis=1) / np.maximum(a[positions].sum(axis=1), 1.0)  # [seeds, steps]
            row = {"loss": loss, "alpha": alpha.tolist(), "alpha_by_seed": by_seed.tolist(),
                   "tau": expected_tau(alpha, draft_len)}
            if loss != reference:
                row["ratio"] = [_with_half_width(paired_ratio_bootstrap(
                    ref[q][..., n], ref[positions][..., n], a[q][..., n], a[positions][..., n],
                    resamples=resamples, confidence=confidence)) for n in range(alpha.shape[0])]
                row["tau_ratio"] = _with_half_width(paired_tau_bootstrap(
                    ref[q], ref[positions], a[q], a[positions], draft_len=draft_len, resamples=resamples,
                    confidence=confidence))
            rows.append(row)
        tails[tail] = rows
    return {
        "reference": reference, "draft_len": draft_len, "seeds": len(heldout[reference]),
        "sequences": len(first.sample_ids), "steps": int(first.sums.shape[2]),
        "positions": first.sums[positions].sum(axis=0).astype(int).tolist(),
        "evaluated_at": sorted({sums.step for runs in heldout.values() for sums in runs}, key=str),
        "tails": tails,
        "checks": {tail: sizing_checks(rows, reference) for tail, rows in tails.items()},
    }


def sizing_checks(rows: list[dict], reference: str) -> dict:
    """Issue 11's sizing goals at draft step 1 under one tail mode: α(reference) ≥ ALPHA_GOAL, and per loss
    the half-width of the α(loss) ÷ α(reference) interval ≤ HALF_WIDTH_GOAL (as the tables print it)."""
    alpha = next(r for r in rows if r["loss"] == reference)["alpha"][0]
    widths = {r["loss"]: r["ratio"][0]["half_width"] for r in rows if "ratio" in r}
    return {"reference_alpha_step1": alpha, "alpha_goal": ALPHA_GOAL, "alpha_met": alpha >= ALPHA_GOAL,
            "half_width_step1": widths, "half_width_goal": HALF_WIDTH_GOAL,
            "half_width_met": {loss: width <= HALF_WIDTH_GOAL for loss, width in widths.items()}}


def _with_half_width(interval: Interval) -> dict:
    return {**interval.to_dict(), "half_width": (interval.high - interval.low) / 2}


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
            **_greedy_check(report), "bench": report.get("config", {})}


# ------------------------------------------------------------------------------- writing
def write_study(study: dict, out: Path) -> None:
    """study.md, the plots of the parts present and, last, study.json into `out`, each atomically.

    A study.json that reads therefore comes with the study.md and plots of the same results.
    """
    out = Path(out)
    atomic_write(out / STUDY_MD, markdown(study).encode())
    families = study.get("reproduction") or []
    if families:
        plot_heldout(families, out / HELDOUT_PLOT)
    for family in families:
        plot_reproduction(family, out / tau_plot_name(family["label"]))
    if "topk" in study:
        plot_topk(study["topk"], out / TOPK_PLOT)
    atomic_write(out / STUDY_JSON, (json.dumps(study, indent=1, default=str) + "\n").encode())


def _ci(interval: dict | None) -> str:
    if not interval:
        return "–"
    return f"{interval['estimate']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def _ci_half(interval: dict | None) -> str:
    """An interval with its half-width in percent (ratio units × 100)."""
    return "–" if not interval else f"{_ci(interval)} ±{100 * interval['half_width']:.1f}%"


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(study: dict) -> str:
    """Tables of every part: per drafter family, held-out α (primary) and τ (secondary); then top-k."""
    lines = ["# lkspec study", ""]
    for family in study.get("reproduction") or []:
        lines += _reproduction_markdown(family)
    if "topk" in study:
        lines += _topk_markdown(study["topk"])
    if study.get("timings"):
        lines += ["Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in study["timings"].items()), ""]
    return "\n".join(lines)


def _heldout_markdown(part: dict) -> list[str]:
    heldout, reference = part["heldout"], part["reference"]
    losses = [row["loss"] for row in heldout["tails"]["drop"]]
    others = [loss for loss in losses if loss != reference]
    confidence = next((r["tau_ratio"]["confidence"] for r in heldout["tails"]["drop"] if "tau_ratio" in r), 0.95)
    exact_note = ("; the exact α is Σ_V min(p, q) against the target's full distribution"
                  if "exact" in heldout["tails"] else "")
    lines = ["### Held-out α per draft step (primary measure)", "",
             f"{heldout['sequences']} held-out sequences × {heldout['seeds']} seed(s) per loss "
             f"({heldout['positions'][0]} scored positions at step 1 per run), α against the cached top-k target. "
             "The tail beyond the top-k bounds the true α: dropped (Σ_top-k min(p, q), a lower bound) and as "
             f"one bucket (+ min(r, Q_tail), an upper bound){exact_note}. Ratio: pooled α(loss) ÷ "
             f"α({reference}); brackets: {confidence:.0%} paired bootstrap over seeds and sequences; ±: the "
             f"interval's half-width. E[τ] = 1 + Σ_k Π_j≤k α_j at K = {heldout['draft_len']}.", ""]
    for tail, tail_rows in heldout["tails"].items():
        rows = {row["loss"]: row for row in tail_rows}
        lines += [f"{MEASURE_TITLES[tail]}:", "",
                  "| step | " + " | ".join(f"α {loss}" for loss in losses) + " | "
                  + " | ".join(f"{loss} ÷ {reference}" for loss in others) + " |",
                  "|---|" + "---|" * (len(losses) + len(others))]
        for n in range(heldout["steps"]):
            cells = [_f(rows[loss]["alpha"][n]) for loss in losses]
            cells += [_ci_half(rows[loss]["ratio"][n]) for loss in others]
            lines.append(f"| {n + 1} | " + " | ".join(cells) + " |")
        cells = [_f(rows[loss]["tau"]) for loss in losses] + [_ci_half(rows[loss]["tau_ratio"]) for loss in others]
        lines += ["| E[τ] | " + " | ".join(cells) + " |", ""]
    lines += ["Sizing at step 1 (the true α lies between the two tail modes; exact where scored):", ""]
    for tail, checks in heldout["checks"].items():
        widths = ", ".join(f"{loss} ÷ {reference} ±{100 * width:.1f}% "
                           f"({'met' if checks['half_width_met'][loss] else 'missed'})"
                           for loss, width in checks["half_width_step1"].items())
        lines.append(f"- {MEASURE_LABELS[tail]}: α({reference}) = "
                     f"{_f(checks['reference_alpha_step1'])}, goal ≥ {checks['alpha_goal']:g}: "
                     f"{'met' if checks['alpha_met'] else 'missed'}; half-widths {widths or '–'}, goal ≤ "
                     f"{100 * checks['half_width_goal']:g}%")
    lines.append("")
    return lines


def _reproduction_markdown(part: dict) -> list[str]:
    rows, reference = part["rows"], part["reference"]
    others = [loss for loss in part["losses"] if loss != reference]
    confidence = next((r["ratio"]["confidence"] for r in rows if "ratio" in r), 0.95)
    bench = part["bench"]
    lines = [f"## {part['label']}: LK vs KL", "",
             f"Drafter `{part['drafter']}`: {len(part['seeds'])} seed(s) × {len(part['losses'])} losses, one cache.",
             ""]
    lines += _heldout_markdown(part)
    lines += ["### τ on the benchmarks (secondary measure)", "",
              f"K = {bench.get('k')}, {bench.get('limit')} prompts per domain, {bench.get('max_new_tokens')} new "
              f"tokens. τ: tokens per target forward / as the paper computes it (K·accepted/drafted + 1). Ratios: "
              f"pooled τ(loss) ÷ τ({reference}) in tokens per forward; brackets: {confidence:.0%} paired bootstrap "
              f"over seeds and prompts; last columns: {confidence:.0%} t-interval over the per-seed ratios.", "",
              "| T | domain | " + " | ".join(f"τ {loss}" for loss in part["losses"]) + " | "
              + " | ".join(f"{loss} ÷ {reference} [bootstrap]" for loss in others) + " | "
              + " | ".join(f"{loss} ÷ {reference} [t, seeds]" for loss in others) + " |",
              "|---|---|" + "---|" * (len(part["losses"]) + 2 * len(others))]
    keys = list(dict.fromkeys((r["temperature"], r["benchmark"]) for r in rows))
    by = {(r["temperature"], r["benchmark"], r["loss"]): r for r in rows}
    for temperature, domain in keys:
        cells = [f"{_f(row['tau'])} / {_f(row.get('tau_paper'))}"
                 for row in (by[(temperature, domain, loss)] for loss in part["losses"])]
        cells += [_ci(by[(temperature, domain, loss)]["ratio"]) for loss in others]
        cells += [_ci(by[(temperature, domain, loss)]["seed_t_interval"]) for loss in others]
        n = by[(temperature, domain, reference)]["num_prompts"]
        lines.append(f"| {temperature:g} | {domain} (n={n}) | " + " | ".join(cells) + " |")
    lines += ["", _lossless_line(part), ""]
    return lines


def _lossless_line(part: dict) -> str:
    return (f"Lossless check at T = 0: {part['greedy_mismatches']} failure(s) (outputs that differ from target "
            f"greedy); {part['greedy_near_ties']} output(s) that differ first at a near-tie of the target's top-2 "
            f"logits (eval.exactness: not a failure).")


def _topk_markdown(part: dict) -> list[str]:
    rows = part["rows"]
    bench = part["bench"]
    domains = list(dict.fromkeys(r["benchmark"] for r in rows))
    lines = ["## Top-k fidelity", "",
             f"Drafter `{part.get('drafter')}`. Reference: `{part['online']}` (trained on the target's full "
             f"distribution). K = {bench.get('k')}, "
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
        ax.set_title(f"{part['label']}, T = {temperature:g}")
    axes[0][0].set_ylabel("τ ratio (bootstrap CI)")
    axes[0][-1].legend(fontsize=8)
    save_png(fig, path, dpi=100)


def plot_heldout(families: list[dict], path: Path) -> None:
    """Held-out α per draft step: a line per loss (tail dropped), a band up to the bucket bound, a panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for ax, family in zip(axes[0], families):
        heldout = family["heldout"]
        steps = np.arange(1, heldout["steps"] + 1)
        buckets = {row["loss"]: row["alpha"] for row in heldout["tails"]["bucket"]}
        exact = {row["loss"]: row["alpha"] for row in heldout["tails"].get("exact", [])}
        for row in heldout["tails"]["drop"]:
            line, = ax.plot(steps, row["alpha"], marker="o", label=row["loss"])
            ax.fill_between(steps, row["alpha"], buckets[row["loss"]], color=line.get_color(), alpha=0.15, lw=0)
            if row["loss"] in exact:
                ax.plot(steps, exact[row["loss"]], ls="--", color=line.get_color(), label=f"{row['loss']} (exact)")
        ax.set_xticks(steps)
        ax.set_xlabel("draft step (head)")
        ax.set_title(family["label"])
        ax.set_ylim(0, None)
    axes[0][0].set_ylabel("held-out α (band: tail bounds; --: exact)")
    axes[0][-1].legend(fontsize=8)
    save_png(fig, path, dpi=100)


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
    save_png(fig, path, dpi=100)
