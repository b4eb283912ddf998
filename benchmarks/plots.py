"""PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _style(name: str):
    if name == "semtoken":
        return {"color": "crimson", "lw": 2.5, "marker": "o", "zorder": 5}
    if name.startswith("semtoken_"):
        return {"lw": 1.2, "marker": ".", "ls": "--"}
    return {"lw": 1.5, "marker": "s"}


def recall_vs_tokens(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, m in results["methods"].items():
        pts = sorted((v["achieved_ratio_mean"], v["recall"], v["over_budget"]) for v in m["budgets"].values())
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if name == "none":
            ax.scatter(xs[:1], ys[:1], color="black", marker="*", s=120, label=f"{m['label']}", zorder=6)
            continue
        line, = ax.plot(xs, ys, label=f"{m['label']} (n={m['n_questions']})", **_style(name))
        over = [(x, y) for x, y, o in pts if o > 0]
        if over:   # hollow rings mark budgets where the method was over budget on some questions
            ax.scatter([p[0] for p in over], [p[1] for p in over], s=160, facecolors="none",
                       edgecolors=line.get_color(), linewidths=1.2, zorder=6)
    for b in results["config"]["budgets"]:
        ax.axvline(b, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("tokens kept (mean achieved ratio, Llama-3 tokens)")
    ax.set_ylabel("answer recall")
    ax.set_title(f"NQ 20 passages, gold at random position — {results['name']}\n"
                 "(ring: over budget on some questions)", fontsize=10)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def latency(results: dict, path: Path) -> Path:
    rows = []
    for name, m in results["methods"].items():
        lat = m["latency"]
        if name == "none":
            continue
        rows.append((m["label"] + " (cold)" if lat["warm_median_s"] is not None else m["label"],
                     lat["cold_median_s"], lat["cold_p95_s"], name))
        if lat["warm_median_s"] is not None:
            rows.append((m["label"] + " (warm)", lat["warm_median_s"], lat["warm_p95_s"], name))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    med = [max(r[1] * 1000, 1e-3) for r in rows]
    p95 = [max(r[2] * 1000, 1e-3) for r in rows]
    colors = ["crimson" if r[3] == "semtoken" else "steelblue" for r in rows]
    ax.barh(list(ys), med, color=colors, alpha=0.85, label="median")
    ax.scatter(p95, list(ys), color="black", marker="|", s=200, label="p95", zorder=5)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency per question and budget (ms, log scale)")
    ax.set_title(f"Latency per method — {results['name']} ({results['machine']['cpu_count']} CPUs)", fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def positions(results: dict, path: Path) -> Path | None:
    pos = results.get("positions")
    if not pos:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cols = pos["positions"]
    for name, by_pos in pos["recall"].items():
        ax.plot(range(len(cols)), [by_pos.get(c) for c in cols], label=pos["labels"].get(name, name), **_style(name))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_xlabel("gold passage position (of 20)")
    ax.set_ylabel(f"answer recall at {float(pos['budget']):.0%}")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    which = f"questions {pos['questions']}" if pos.get("questions") else f"first {pos['n']} questions"
    ax.set_title(f"Lost in the middle — {which}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def e2e(results: dict, path: Path) -> Path | None:
    e = results.get("e2e")
    if not e:
        return None
    names = list(e["contexts"])
    acc = [e["contexts"][n]["accuracy"] for n in names]
    pre = [e["contexts"][n]["prefill_median_s"] for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.4 * len(names) + 1.8), sharey=True)
    a1.barh(names, acc, color="seagreen")
    a1.set_xlabel("SmolLM2 accuracy (best subspan, first line)")
    a1.invert_yaxis()
    a2.barh(names, pre, color="slategray")
    a2.set_xlabel("prefill median (s)")
    for a in (a1, a2):
        a.grid(axis="x", alpha=0.3)
        a.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"End to end at {float(e['budget']):.0%} — {results['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def all_plots(results: dict, out_dir: Path, name: str) -> list[Path]:
    paths = [recall_vs_tokens(results, out_dir / f"{name}_recall.png"),
             latency(results, out_dir / f"{name}_latency.png"),
             positions(results, out_dir / f"{name}_positions.png"),
             e2e(results, out_dir / f"{name}_e2e.png")]
    return [p for p in paths if p is not None]
