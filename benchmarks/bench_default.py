"""The README's main job, measured: ``lowmem-train recipes/default.yaml`` end to end in a fresh process.

Reported: total wall time (model load, tokenization, training, evals, saving), training wall
time, peak RSS of the process, eval loss before and after, and whether the saved model loads.

    python benchmarks/bench_default.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(recipe: str, out: Path) -> tuple[float, float, dict, list[dict]]:
    """``lowmem-train recipes/<recipe>`` in a fresh process: (total wall s, peak RSS GiB of the
    process, summary.json, the eval records of metrics.jsonl)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowmem.cli", str(ROOT / "recipes" / recipe),
                           f"output.dir={out}", "--quiet", "--overwrite"], capture_output=True, text=True, cwd=ROOT)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.strip().splitlines()[-1])
    peak_rss_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return total, peak_rss_gib, summary, [r for r in records if "eval_loss" in r]


def main() -> None:
    out = ROOT / "runs" / "bench-default"
    total, peak_rss_gib, summary, evals = run_recipe("default.yaml", out)
    curve = ", ".join(f"{r['step']}: {r['eval_loss']:.3f}" for r in evals)
    from transformers import AutoModelForCausalLM

    loads = AutoModelForCausalLM.from_pretrained(out / "model") is not None
    cuda = summary.get("peak_cuda_gb")  # on a GPU the tensors live there: its peak, besides the process RSS
    rows = [[summary["optimizer"], summary["steps"], f"{total:.0f}", f"{summary['wall_time_s']:.0f}",
             f"{peak_rss_gib:.2f}"] + ([f"{cuda:.2f}"] if cuda is not None else [])
            + [f"{summary['eval_loss_before']:.4f}", f"{summary['eval_loss']:.4f}", "yes" if loads else "no"]]
    table = markdown_table(["optimizer", "steps", "total wall s", "train wall s", "peak RSS GiB"]
                           + (["peak CUDA GiB"] if cuda is not None else [])
                           + ["eval loss before", "eval loss after", "model loads"], rows)
    where = "CUDA" if cuda is not None else "CPU"
    write_result("default", f"Default recipe: SmolLM2-135M fine-tuned on BBC News (offline, {where})", table,
                 notes=f"Eval loss by step: {curve}.")


if __name__ == "__main__":
    main()
