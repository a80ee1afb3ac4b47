"""The shipped SFT recipe (``recipes/sft-smollm2.yaml``): eval loss on the answers of the 30 held-out
conversations before, during and after fine-tuning, and the step's tokens/s (non-padding tokens).

Runs ``lowmem-train recipes/sft-smollm2.yaml`` into a temporary directory and tabulates its metrics.jsonl;
``--metrics runs/x/metrics.jsonl`` tabulates a run made with that command instead (partial runs included).

Usage: python benchmarks/bench_sft_recipe.py [--metrics PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def table(metrics: Path) -> str:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [[r["step"], f"{r['eval_loss']:.4f}"] for r in records if "eval_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    rows = [[step, loss, ""] for step, loss in evals]
    if speeds:
        rows[-1][2] = f"{sum(speeds) / len(speeds):.1f} (mean of {len(speeds)} steps)"
    return markdown_table(["step", "eval loss on the answers (30 held-out conversations)", "train tokens/s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, help="metrics.jsonl of a run of recipes/sft-smollm2.yaml")
    args = parser.parse_args()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as out:
        metrics = args.metrics
        if metrics is None:
            subprocess.run([sys.executable, "-m", "lowmem.cli", str(ROOT / "recipes" / "sft-smollm2.yaml"),
                            f"output.dir={out}", "output.save_model=false", "--quiet"], cwd=ROOT, check=True)
            metrics = Path(out) / "metrics.jsonl"
        text = table(metrics)
    write_result("sft_recipe", "The shipped SFT recipe: eval loss on the answers falls (issue 29)", text,
                 notes=("SmolLM2-135M-Instruct (GGUF, its own chat template), AdamW lr 1e-4, 2 packed rows of 256 "
                        "tokens a step, bf16 autocast, loss on the assistant turns only; eval on the 30 held-out "
                        "records of recipes/data/bbc-instruct/eval.jsonl. Load average when the table was written: "
                        f"{load} (a shared 2-core machine: tokens/s are far below an idle machine's)."))


if __name__ == "__main__":
    main()
