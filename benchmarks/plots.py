"""PNG figures for benchmarks/RESULTS.md (matplotlib, no display needed).

* ``memory_by_method.png``: one-step peak RSS per method, measured and predicted
  (from ``results/peak_memory.json``, written by bench_peak_memory.py);
* ``loss_curves.png``: training loss against step of every run directory given
  (each holding the trainer's ``metrics.jsonl``);
* ``largest.png``: peak RSS against model size per way of training, and where each way stopped
  (drawn by bench_largest.py from its kept rows).

Usage: python benchmarks/plots.py [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _save(fig, ax, out: Path, xlabel: str, ylabel: str | None = None) -> Path:
    """The common tail of every figure: axis labels, legend, tight layout, write ``out``, close."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def memory_by_method(rows: list[dict], out: Path) -> Path:
    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["peak"] / 2**20 for r in rows], height=0.4, label="measured peak RSS")
    ax.barh([i - 0.2 for i in y], [r["predicted"] / 2**20 for r in rows], height=0.4, label="planner")
    ax.axvline(rows[0]["peak"] / 2**20, color="gray", linestyle="--", label="no-grad forward")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title("One-step peak memory by method")
    return _save(fig, ax, out, xlabel="MiB")


def loss_curves(run_dirs: list[Path], out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for run in run_dirs:
        records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
        steps = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] == r["loss"]]
        if steps:
            ax.plot(*zip(*steps), label=run.name)
            plotted += 1
    if not plotted:
        plt.close(fig)
        return None
    return _save(fig, ax, out, xlabel="step", ylabel="training loss")


def largest_ladder(rows: list[dict], out: Path, ram_gib: float) -> Path:
    """Peak RSS (GiB) against parameters (B) per way of training; a rung that did not complete is an
    ``x`` on the RAM line; dotted, the planned peak (the largest planned phase) of every rung planned."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for way in dict.fromkeys(r["way"] for r in rows):
        done = [(r["params_b"], r["peak_rss_gb"]) for r in rows if r["way"] == way and r["outcome"] == "ok"]
        line = ax.plot(*zip(*done), marker="o", label=way)[0] if done else None
        plan = [(r["params_b"], max(r["plan"]["phases"].values())) for r in rows if r["way"] == way and "plan" in r]
        if plan:
            ax.plot(*zip(*plan), linestyle=":", marker=".", color=line.get_color() if line else None)
        stopped = [r["params_b"] for r in rows if r["way"] == way and r["outcome"] != "ok"]
        if stopped:
            ax.plot(stopped, [ram_gib] * len(stopped), "x", markersize=10,
                    color=line.get_color() if line else None, label=None if line else f"{way} (stopped)")
    ax.axhline(ram_gib, color="gray", linestyle="--", label=f"RAM {ram_gib:.1f} GiB")
    ax.set_xscale("log")
    ax.set_title("Build, 2 steps, eval, save: peak RSS by model size\n(solid: measured, x: did not complete; dotted: "
                 "planned)", fontsize=10)
    return _save(fig, ax, out, xlabel="parameters (billions)", ylabel="peak RSS (GiB)")


def make_all(run_dirs: list[Path]) -> list[Path]:
    """Every figure whose inputs exist (the loss curves: drawn from ``run_dirs``, else kept); returns their paths."""
    made = []
    peak = RESULTS / "peak_memory.json"
    if peak.exists():
        made.append(memory_by_method(json.loads(peak.read_text()), RESULTS / "memory_by_method.png"))
    runs = [d for d in run_dirs if (d / "metrics.jsonl").exists()]
    curves = RESULTS / "loss_curves.png"
    if runs:
        loss_curves(runs, curves)
    return made + ([curves] if curves.exists() else [])  # without runs: the figure of the last ones


if __name__ == "__main__":
    for path in make_all([Path(a) for a in sys.argv[1:]]):
        print(path)
