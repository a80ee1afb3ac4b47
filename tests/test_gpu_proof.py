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
    assert list(steps) == ["pytest_gpu", "kernels", "adamw8bit", "llama_step", "zo2", "zo_noise", "fuyou", "quantized",
                           "fsdp2"]
    # FSDP2 against DDP needs 2 CUDA devices: skipped with one line (its CPU parts: the test below)
    assert {name: e["status"] for name, e in steps.items()} == {**dict.fromkeys(steps, "ok"), "fsdp2": "skipped"}
    skip = [line for line in run.stdout.splitlines() if line.startswith("[gpu_proof] fsdp2:")]
    assert len(skip) == 1 and "0 CUDA device(s): FSDP2 against DDP needs at least 2" in skip[0], run.stdout
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


def test_fsdp2_step_commands_and_reading(tmp_path):
    """The multi-GPU step's CPU parts (benchmarks/gpu_proof_fsdp.py): its recipes validate (the GPU one
    too), the three command lines are the documented ones, and a run made from the one-process command is
    read back (its losses, speed, peak); two identical runs are not an FSDP2 saving (not ok)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_proof_fsdp as proof
        from gpu_proof_report import SECTIONS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from lowmem.cli import main
    from lowmem.recipe import load_recipe

    assert load_recipe(str(proof.write_recipe(tmp_path / "gpu", cpu=False))).model.config["hidden_size"] == 2048
    recipe = proof.write_recipe(tmp_path, cpu=True, steps=3)
    cmds = proof.commands(recipe, 2, tmp_path / "runs")
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowmem.cli", str(recipe)]
    for mode in ("ddp", "fsdp2"):
        assert cmds[mode][1:] == [*launch, f"train.distributed={mode}", f"output.dir={tmp_path / 'runs' / mode}",
                                  "--quiet"]
    assert cmds["one"][1:4] == ["-m", "lowmem.cli", str(recipe)] and "train.grad_accum=2" in cmds["one"]
    assert main(cmds["one"][3:]) == 0  # the one-process command's arguments, run by lowmem.cli in this process
    run = proof.read_run(tmp_path / "runs" / "one")
    metrics = (tmp_path / "runs" / "one" / "metrics.jsonl").read_text().splitlines()
    assert run["losses"] == [json.loads(r)["loss"] for r in metrics if '"loss"' in r] and len(run["losses"]) == 3
    assert run["tokens_per_s"] > 0 and run["peak_rss_GiB"] > 0 and run["peak_cuda_GiB"] is None
    same = proof.compare({"one": run, "ddp": run, "fsdp2": run})
    assert same["fsdp2"]["rel_diff"] == 0 and same["fsdp2_peak_over_ddp"] == 1 and same["ok"]  # no CUDA peak
    other = {**run, "grad_norms": [g * (1 + 2 * proof.LOSS_RTOL) for g in run["grad_norms"]]}
    assert not proof.compare({"one": run, "ddp": other, "fsdp2": run})["ok"]
    runs = {"one": run, "ddp": run, "fsdp2": run}
    table = SECTIONS["fsdp2"][1]({"device": "cpu", "processes": 2, "command": "cmd", "runs": runs, **same})
    assert "peak RSS GiB (rank 0)" in table and len(table.splitlines()) == 2 + 2 + 3  # command, blank, header and rule, 3 runs
    assert proof.too_few(1).startswith("1 CUDA device(s)") and proof.too_few(2) is None
