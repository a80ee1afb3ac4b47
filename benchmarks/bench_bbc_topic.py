"""MeZO prompt fine-tuning, measured: ``lowmem-train recipes/bbc-topic-mezo.yaml`` end to end.

Reported: zero-shot accuracy (the step-0 eval) and accuracy after fine-tuning on the held-out
BBC articles, eval loss, wall time and peak RSS of the process.

    python benchmarks/bench_bbc_topic.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402
from bench_default import ROOT, run_recipe  # noqa: E402


def main() -> None:
    total, peak_rss_gib, summary, evals = run_recipe("bbc-topic-mezo.yaml", ROOT / "runs" / "bench-bbc-topic")
    rows = [[r["step"], 2 * r["step"], f"{r['eval_loss']:.4f}", f"{r['eval_accuracy']:.3f}"] for r in evals]
    table = (markdown_table(["step", "forwards", "eval loss", "eval accuracy"], rows)
             + f"\n\nTotal wall {total:.0f} s (training {summary['wall_time_s']:.0f} s), peak RSS "
               f"{peak_rss_gib:.2f} GiB"
             + (f", peak CUDA {summary['peak_cuda_gb']:.2f} GiB" if summary.get("peak_cuda_gb") is not None else "")
             + f", {summary['skipped_steps']} skipped steps.")
    write_result("bbc_topic", "BBC topic classification with MeZO (recipes/bbc-topic-mezo.yaml, CPU)", table,
                 notes="SmolLM2-135M-Instruct, MeZO on the norm weights only (model.trainable), 5 candidate "
                       "topics, accuracy on 100 held-out articles (eval_batches x batch_size); step 0 is zero-shot.")


if __name__ == "__main__":
    main()
