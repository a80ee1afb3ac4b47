"""FSDP2 against DDP (issue 26): per-rank parameter and optimizer-state bytes, each rank's peak RSS in
the build, step and save phases, step time, for N = 1, 2 (4 with ``--four``) CPU processes (gloo) on the
default recipe's model.

Each configuration is ``torchrun --nproc_per_node N -m lowmem.cli recipes/default.yaml`` with
``train.distributed`` set, a few steps, fp32, no checkpoints, the model saved; the figures come from the run's
``summary.json`` (``parameter_mb_per_rank`` and ``optimizer_state_mb_per_rank`` from the local
shards under FSDP2; under DDP every rank holds everything, so they are the one-process figures).

    python benchmarks/bench_fsdp.py [--optimizers adamw apollo_mini] [--steps 4] [--four]
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


def run(optimizer: str, mode: str, processes: int, steps: int, out: Path) -> dict:
    """One ``torchrun`` launch; its summary.json (rank 0's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m",
           "lowmem.cli", str(ROOT / "recipes" / "default.yaml"), f"optim.name={optimizer}", "optim.args={}",
           f"train.distributed={mode}", f"train.steps={steps}", "train.batch_size=2", "train.warmup_steps=0",
           "train.eval_batches=4", "train.eval_every=0", "train.checkpoint_every=0", "train.mixed_precision=no",
           f"output.dir={out}", "--quiet"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()] or ["?"]
        raise SystemExit(f"{mode} x{processes} {optimizer}: {errors[0]}")
    return json.loads((out / "summary.json").read_text())


def ranks(summary: dict) -> list[dict]:
    """Each rank's peak RSS by phase (GiB), rank 0's first."""
    return summary.get("peak_rss_by_phase_gb_per_rank", [summary["peak_rss_by_phase_gb"]])


def per_rank(summary: dict, phase: str) -> str:
    return " / ".join(f"{r[phase]:.2f}" for r in ranks(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "apollo_mini"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--four", action="store_true", help="also 4 processes")
    args = parser.parse_args()
    counts = [1, 2, 4] if args.four else [1, 2]
    rows, start = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in args.optimizers:
            for processes in counts:
                for mode in ("ddp", "fsdp2"):
                    s = run(optimizer, mode, processes, args.steps, Path(tmp) / f"{optimizer}-{mode}-{processes}")
                    param_mb = s.get("parameter_mb_per_rank")
                    rows.append([optimizer, mode, processes,
                                 "all" if param_mb is None else f"{param_mb:.1f}",
                                 f"{s.get('optimizer_state_mb_per_rank', s['optimizer_state_mb']):.1f}",
                                 *(per_rank(s, phase) for phase in ("build", "step", "save")),
                                 f"{sum(max(r.values()) for r in ranks(s)):.2f}",
                                 f"{s['wall_time_s'] / s['steps']:.2f}", f"{s['eval_loss']:.4f}"])
    table = markdown_table(["optimizer", "distributed", "processes", "params MiB/rank", "opt. state MiB/rank",
                            "build GiB per rank", "step GiB per rank", "save GiB per rank",
                            "sum of rank peaks GiB", "s/step", "eval loss"], rows)
    load = os.getloadavg()[0]
    write_result("fsdp", "FSDP2 against DDP: per-rank bytes and step time (CPU, gloo)", table,
                 f"Load average at the start / end: {start:.1f} / {load:.1f} (2 shared cores: the step times are "
                 f"only comparable within this run; with 4 processes on 2 cores, ranks wait for each other). "
                 f"Under DDP every rank holds all parameters (\"all\") and the whole optimizer state. Under "
                 f"FSDP2 the per-rank figures are the local shards plus what a rank replicates (APOLLO-Mini's "
                 f"projected state: its random projection is all-reduced, lowmem/optim/dtensor.py). Peak RSS by "
                 f"phase (lowmem.trainer, VmHWM) of each rank, rank 0 first: under FSDP2 only rank 0 reads the "
                 f"weights (the others build on meta and receive their rows, lowmem.fsdp.load_from_rank0) and only "
                 f"rank 0 gathers them to save; under DDP every rank builds the whole model. The sum of the ranks' "
                 f"peaks bounds what the host holds at once.")


if __name__ == "__main__":
    main()
