"""Write the evaluation report: `report.json`, `report.md` and `report.png`."""

from __future__ import annotations

import io as _io
import json
from typing import TYPE_CHECKING

from fusion_ray import io as fio

if TYPE_CHECKING:
    from fusion_ray.config import FusionConfig

ARM_ORDER = ("source:", "pivot", "clm_only", "fused:", "merged")


def _order(arm: str) -> tuple[int, str]:
    return next(i for i, p in enumerate(ARM_ORDER) if arm.startswith(p) or arm == p), arm


def markdown(report: dict) -> str:
    bpb = report["bpb"]
    arms = sorted(bpb, key=_order)
    domains = sorted({d for v in bpb.values() for d in v})
    lines = [f"# fusion_ray report: {report.get('config', '')}", "",
             "Held-out bits per UTF-8 byte of the assistant replies (lower is better).", "",
             "| arm | " + " | ".join(domains) + " | model |", "|---|" + "---:|" * len(domains) + "---|"]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(f"{bpb[arm].get(d, float('nan')):.4f}" for d in domains)
                     + f" | `{report['models'].get(arm, '')}` |")
    clm = bpb.get("clm_only")
    if clm:
        lines += ["", "Δ bpb against the CLM-only arm (negative: fusion helps).", "",
                  "| arm | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
        for arm in arms:
            if arm.startswith("fused:") or arm == "merged":
                lines.append(f"| {arm} | " + " | ".join(f"{bpb[arm][d] - clm[d]:+.4f}" for d in domains) + " |")
    if report.get("source_domain"):
        lines += ["", "Source specialisations: " + ", ".join(
            f"{s} → {d}" if d else f"{s} (no domain given)" for s, d in report["source_domain"].items())]
    for pair, stats in (report.get("routing") or {}).items():
        if not stats:
            continue
        candidates = list(next(iter(stats.values()))["mean_weight"])
        lines += ["", f"Fuse routing for `{pair}` (share of samples each candidate won, per domain):", "",
                  "| domain | " + " | ".join(candidates) + " |", "|---|" + "---:|" * len(candidates)]
        for domain, s in stats.items():
            total = max(sum(s["wins"].values()), 1)
            lines.append(f"| {domain} | " + " | ".join(f"{s['wins'].get(c, 0) / total:.1%}" for c in candidates)
                         + " |")
    if report.get("stages"):
        lines += ["", "| stage | wall time (s) | peak memory (MiB) |", "|---|---:|---:|"]
        for stage, s in report["stages"].items():
            mem = s.get("peak_rss_mb")
            wall = s.get("wall_time_s")
            lines.append(f"| {stage} | {'' if wall is None else f'{wall:.1f}'} | "
                         f"{'' if mem is None else f'{mem:.0f}'} |")
    mean_bpb = {arm: sum(v.values()) / len(v) for arm, v in bpb.items() if v}
    lines += chat_lines(report, "held-out bpb (mean over domains)", {a: f"{v:.4f}" for a, v in mean_bpb.items()})
    return "\n".join(lines) + "\n"


def ci_text(ci, pct: bool) -> str:
    """" [lo, hi]" of a 95 % interval (as percentages with `pct`), or "" without one."""
    if not ci:
        return ""
    return f" [{ci[0]:.1%}, {ci[1]:.1%}]" if pct else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def chat_lines(report: dict, first: str, firsts: dict[str, str]) -> list[str]:
    """The chat metrics (judge grades, pairwise and LC win rates with their 95 % bootstrap
    intervals) per arm next to the report's own first metric, and lm-eval's results."""
    lines: list[str] = []
    chat = report.get("chat") or {}
    judge = chat.get("judge")
    if judge:
        arms = judge["arms"]
        single = any(r.get("single") for r in arms.values())
        baselines = [b for b in (judge["baseline"] if isinstance(judge["baseline"], list) else [judge["baseline"]])
                     if any(b in (r.get("pairwise") or {}) for r in arms.values())]
        head = ["arm", first] + (["judge score (1–10)"] if single else []) \
            + [h for b in baselines for h in (f"win rate vs {b}", f"LC vs {b}")]
        lines += ["", f"Chat evaluation: {chat['questions']} questions, {judge.get('kind', 'LLM')} judge "
                  f"`{judge['model']}` "
                  f"({judge['samples']} sample(s) per item), 95 % bootstrap intervals over questions. "
                  "Pairwise: both orders, a verdict that flips with the order is a tie; "
                  "LC: the win rate with the answers' length difference regressed out.", "",
                  "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for arm, r in arms.items():
            row = [arm, firsts.get(arm, "—")]
            if single:
                s = r.get("single")
                row.append(f"{s['mean']:.2f}{ci_text(s.get('ci'), False)}" if s and s.get("n") else "—")
            for b in baselines:
                p = (r.get("pairwise") or {}).get(b)
                row += ([f"{p['win_rate']:.1%}{ci_text(p.get('ci'), True)}",
                         f"{p['lc_win_rate']:.1%}{ci_text(p.get('lc_ci'), True)}"] if p and p.get("n") else ["—", "—"])
            lines.append("| " + " | ".join(row) + " |")
        lost = {k: judge.get(k, 0) for k in ("failed", "over_budget") if judge.get(k)}
        lines += ["", f"Judge calls: {judge.get('calls', 0)} made, {judge.get('reused', 0)} reused from saved "
                  "judgements"
                  + "".join(f", {v} {k.replace('_', ' ')}" for k, v in lost.items())
                  + (" (the budget eval.chat.judge.max_calls was hit)" if judge.get("budget_hit") else "") + "."]
    elif chat:
        lines += ["", f"Chat answers: {', '.join(chat['arms'])} answered {chat['questions']} questions "
                  "(no judge configured; the answers are in chat_answers.jsonl)."]
    lm = report.get("lm_eval")
    if lm:
        lines += ["", f"lm-eval {lm.get('lm_eval_version', '')} (± standard error):", "",
                  "| target | task | metric | value |", "|---|---|---|---:|"]
        for target, tasks in lm["results"].items():
            for task, metrics in tasks.items():
                for name, value in metrics.items():
                    if name.endswith("_stderr") or name == "n" or not isinstance(value, int | float):
                        continue
                    err = metrics.get(f"{name}_stderr")
                    err = f" ± {err:.4f}" if isinstance(err, int | float) else ""
                    lines.append(f"| {target} | {task} | {name} | {value:.4f}{err} |")
    return lines


def compared_arms(report: dict) -> list[str]:
    """The arms set against the CLM-only arm: the fused and merged ones (present when it is)."""
    if "clm_only" not in report["bpb"]:
        return []
    return [arm for arm in sorted(report["bpb"], key=_order) if arm.startswith("fused:") or arm == "merged"]


def figure(report: dict):
    """The report's chart as a matplotlib Figure: per domain, each fused or merged arm's Δ bpb
    against the CLM-only arm (arm − clm_only; below the zero line fusion helps), each bar labelled
    with its value. Without a CLM-only arm (or nothing to set against it), absolute bpb per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bpb = report["bpb"]
    domains = sorted({d for v in bpb.values() for d in v})
    compared = compared_arms(report)
    if compared:
        clm = bpb["clm_only"]
        arms = compared
        values = {arm: [bpb[arm].get(d, float("nan")) - clm.get(d, float("nan")) for d in domains] for arm in arms}
    else:
        arms = sorted(bpb, key=_order)
        values = {arm: [bpb[arm].get(d, 0) for d in domains] for arm in arms}
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(arms) * len(domains) / 2, 4), dpi=110)
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(domains))]
        bars = ax.bar(xs, values[arm], width, label=arm)
        if compared:
            ax.bar_label(bars, fmt="%+.4f", fontsize=7, padding=2)
    ax.set_xticks(range(len(domains)), domains)
    if compared:
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("Δ bits per byte vs CLM-only (below 0: fusion helps)")
        ax.margins(y=0.2)  # room for the bar labels
    else:
        ax.set_ylabel("held-out bits per byte (lower is better)")
        low = min(v for a in bpb.values() for v in a.values())
        ax.set_ylim(bottom=max(0, low * 0.9))
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"fusion_ray: {report.get('config', '')}")
    fig.tight_layout()
    return fig


def chart(report: dict) -> bytes:
    """The report's figure (`figure`, or `implicit_figure` for implicit fusion) as PNG bytes."""
    fig = implicit_figure(report) if report.get("method") == "implicit" else figure(report)
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, out) -> None:
    """Write the three files into a `StageOutput` (atomically, each)."""
    text = implicit_markdown(report) if report.get("method") == "implicit" else markdown(report)
    fio.write_json_atomic(out.path("report.json"), report)
    fio.write_bytes_atomic(out.path("report.md"), text.encode())
    fio.write_bytes_atomic(out.path("report.png"), chart(report))


def implicit_markdown(report: dict) -> str:
    """Implicit fusion's report: accuracy per verifiable domain, mean reward, win rate vs the pivot."""
    arms, labels = list(report["models"]), report["labels"]
    verifiable = sorted({d for per in report["accuracy"].values() for d in per})
    domains = sorted({d for per in report["mean_reward"].values() for d in per})
    overall = report.get("accuracy_all", {})
    lines = [f"# Implicit fusion: {report.get('config', '')}", "",
             "Held-out accuracy (correct / prompts), greedy answers:", "",
             "| arm | " + " | ".join(verifiable) + " | all |", "|---|" + "---|" * (len(verifiable) + 1)]
    lines += [f"| {labels[a]} | " + " | ".join(f"{report['accuracy'][a][d]:.1%}" for d in verifiable)
              + (f" | {overall[a]:.1%} |" if a in overall else " | — |") for a in arms]
    if report.get("fused_vs_best_single") is not None:
        lines += ["", f"Fused SFT+DPO against the best single-source arm ({labels[report['best_single']]}): "
                  f"{report['fused_vs_best_single']:+.1%} accuracy over all verifiable prompts."]
    by = "the reward model" if report["by"] == "reward_model" else "the verifiers (1 correct, 0 not)"
    lines += ["", f"Mean reward per domain (scored by {by}) and win rate against the pivot "
              "(share of held-out prompts where the arm's reward beats the pivot's; ties count half):", "",
              "| arm | " + " | ".join(domains) + " | win rate vs pivot |", "|---|" + "---|" * (len(domains) + 1)]
    for a in arms:
        win = f"{report['win_rate_vs_pivot'][a]:.1%}" if a in report["win_rate_vs_pivot"] else "—"
        lines.append(f"| {labels[a]} | " + " | ".join(f"{report['mean_reward'][a][d]:.4g}" for d in domains)
                     + f" | {win} |")
    lines += chat_lines(report, "held-out accuracy", {a: f"{overall[a]:.1%}" for a in overall})
    lines += ["", "Models: " + ", ".join(f"{labels[a]} `{p}`" for a, p in report["models"].items()), ""]
    return "\n".join(lines)


def implicit_figure(report: dict):
    """Accuracy per verifiable domain: a bar group per domain, a bar per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["models"])
    domains = sorted({d for per in report["accuracy"].values() for d in per})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(domains) * len(arms) / 2), 3.6))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        ax.bar([k + i * width for k in range(len(domains))], [report["accuracy"][arm].get(d, 0) for d in domains],
               width, label=report["labels"][arm])
    ax.set_xticks([k + width * (len(arms) - 1) / 2 for k in range(len(domains))], domains)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"fusion_ray (implicit): {report.get('config', '')}")
    fig.tight_layout()
    return fig


def load(path: str) -> dict:
    """A report.json, local or on an object store."""
    return json.loads(fio.read_text(path))


def stage_manifests(root: str) -> list[dict]:
    """A stage's manifest, or those of its parts (`logits/<model>`, `targets/<arm>`, …)."""
    own = fio.read_manifest(root)
    if own:
        return [own]
    return [m for sub in fio.list_dirs(root) if (m := fio.read_manifest(sub))]


def stage_stats(cfg: FusionConfig) -> dict[str, dict]:
    """Each finished stage's own wall time and peak memory, as the pipeline measured its last run
    (`_stage_stats.json`: from the stage's start to its end, its parts side by side inside it).

    A stage run outside the pipeline has no such record: its wall time is then its manifest's,
    and None for a stage of parts (their times overlap; a sum would overstate the stage).
    """
    sampled = read_stats(cfg)
    stats: dict[str, dict] = {}
    for stage in (s for s in cfg.stages() if s not in ("eval", "serve")):
        manifests = stage_manifests(cfg.stage_dir(stage))
        if not manifests:
            continue
        own = sampled.get(stage, {})
        wall = own.get("last_run_wall_s", manifests[0].get("wall_time_s") if len(manifests) == 1 else None)
        stats[stage] = {"wall_time_s": wall, **({"peak_rss_mb": own["peak_rss_mb"]} if "peak_rss_mb" in own else {})}
    return stats


def read_stats(cfg: FusionConfig) -> dict:
    path = f"{cfg.workdir}/_stage_stats.json"
    return json.loads(fio.read_text(path)) if fio.exists(path) else {}
