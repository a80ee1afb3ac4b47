"""benchmarks/gpu_proof.py cannot rot between GPU sessions: its CPU rehearsal (``--dry-run``: tiny
shapes, every step executed) runs here, and a budget too small for a step skips it with a line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_proof.py"


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_dry_run_executes_every_step(tmp_path):
    run = _run(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_proof.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["pytest_gpu", "kernels", "adamw8bit", "llama_step", "zo2", "zo_noise", "fuyou", "quantized"]
    assert {name: e["status"] for name, e in steps.items()} == dict.fromkeys(steps, "ok")
    assert steps["pytest_gpu"]["skipped"] > 0 and steps["pytest_gpu"].get("failed", 0) == 0
    assert all(r["code_mismatch"] == 0 and r["absmax_equal"] for r in steps["kernels"]["rows"])
    assert {"lowmem AdamW8bit", "torch AdamW (fused)"} <= {n for n, r in steps["adamw8bit"]["rows"].items()
                                                          if "step_ms" in r}
    assert steps["llama_step"]["predicted_GiB"] > 0
    zo2 = steps["zo2"]
    assert zo2["opt30b"]["device_slots"] == 3 and zo2["fit"]["ratio"] > 0
    assert 0.25 < zo2["int8"]["bytes_ratio"] < 0.55 and zo2["int8"]["loss_rel_diff"] < 0.05  # 1.016 vs 2 bytes
    zo = steps["zo_noise"]
    assert all(r["word_mismatch"] == 0 for r in zo["kernel"]) and set(zo["step"]["rows"]) == {"gaussian", "philox"}
    assert steps["fuyou"]["tokens_per_s"] > 0 and steps["fuyou"]["predicted_GiB"] > 0
    quant = steps["quantized"]
    assert quant["int8"]["predicted_GiB"] > 0 and quant["nf4_lora"]["weights_GiB"] > 0 and quant["nf4_lora"]["step_s"] > 0
    text = (tmp_path / "gpu_proof.md").read_text()
    assert "## GPU proof (dry run" in text and "### ZO2 offload" in text and "fp16 vs int8 host copy" in text and "noise kind" in text
    assert "### First-order offload" in text and "pytest -m gpu" in text


def test_budget_end_skips_steps_with_a_line(tmp_path):
    run = _run(tmp_path, "--budget-s", "-1", "--only", "kernels", "zo2")
    assert run.returncode == 0, run.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_proof.json").read_text())["steps"]
    assert list(steps) == ["kernels", "zo2"] and all(e["status"] == "skipped" for e in steps.values())
    assert "[gpu_proof] kernels: skipped" in run.stdout and "of the budget left" in run.stdout
