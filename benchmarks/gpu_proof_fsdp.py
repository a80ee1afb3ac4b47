"""The ``fsdp2`` step of :mod:`gpu_proof` (issue 26): ``lowmem-train`` under FSDP2 on every GPU of the
machine, against DDP and against one process with the same global batch.

Three runs of one recipe (a Llama shape of 0.5 B parameters built from its config, fp32, AdamW,
batch 4 x 512 per process, gradient checkpointing, a generated text corpus; no checkpoints, no saved
model), each the command a user types (:func:`commands`)::

    python -m lowmem.cli RECIPE train.grad_accum=N                      # one process, N micro-batches
    torchrun --nproc_per_node N -m lowmem.cli RECIPE train.distributed=ddp
    torchrun --nproc_per_node N -m lowmem.cli RECIPE train.distributed=fsdp2

From each run's ``summary.json`` and ``metrics.jsonl`` (:func:`read_run`): rank 0's peak CUDA memory
(``torch.cuda.max_memory_allocated``; the ranks hold equal shares) beside the planner's prediction
(``lowmem-train RECIPE --plan --processes 2 --device cuda`` predicts 8.06 GiB for one process or a DDP
rank, 5.15 GiB for an FSDP2 rank of 2, 3.54 of 4), its parameter and optimizer-state
MiB (FSDP2: the local shards), the median tokens/s after the first step, and what must equal the
one-process run: the gradient norms, the final eval loss, and under FSDP2 the logged losses.
:func:`compare` checks them against the one-process run (relative ``LOSS_RTOL``: the ranks sum the
gradient in another order, and cuBLAS/NCCL reductions are not bit-reproducible) and that FSDP2's
peak is below DDP's.

With fewer than 2 CUDA devices the step is skipped with one line (the workplace's GPU machines have
one). The CPU rehearsal runs the same commands on 2 gloo processes with a tiny model (not part of
``gpu_proof.py --dry-run``, to keep CI short; its figures are CPU figures, peak RSS instead of CUDA)::

    python benchmarks/gpu_proof_fsdp.py OUT_DIR --cpu

On a machine with several GPUs, alone: ``python benchmarks/gpu_proof_fsdp.py OUT_DIR`` (all of them),
or within the proof: ``python benchmarks/gpu_proof.py OUT_DIR --only fsdp2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-4
GPU_MODEL = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 tie_word_embeddings=False)
CPU_MODEL = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, tie_word_embeddings=False)
WORDS = ("the market rose as investors cheered while the minister said the campaign would focus on schools "
         "and the film won three awards at the ceremony last night").split()


def write_recipe(out: Path, cpu: bool, steps: int = 6) -> Path:
    """A generated corpus (200 documents) and the recipe of the three runs, under ``out``."""
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(200):
        (corpus / f"{i:03d}.txt").write_text(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(400)))
    tree = {"model": {"config": CPU_MODEL if cpu else GPU_MODEL, "tokenizer": "bytes", "dtype": "float32",
                      "gradient_checkpointing": True},  # few activations: the states make the peak
            "data": {"path": str(corpus), "eval_fraction": 0.05},
            "optim": {"name": "adamw", "lr": 1e-4, "max_grad_norm": 1.0},
            "train": {"steps": steps, "batch_size": 2 if cpu else 4, "seq_len": 32 if cpu else 512,
                      "warmup_steps": 0, "mixed_precision": "no", "eval_batches": 1, "eval_every": 0,
                      "checkpoint_every": 0},
            "output": {"dir": str(out / "runs"), "save_model": False}}
    path = out / "fsdp2_proof.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def commands(recipe: Path, processes: int, out: Path) -> dict[str, list[str]]:
    """The three runs' command lines, keyed ``one``, ``ddp``, ``fsdp2``; each writes under ``out/<key>``."""
    cli = ["-m", "lowmem.cli", str(recipe)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    return {"one": [sys.executable, *cli, f"train.grad_accum={processes}", f"output.dir={out / 'one'}", "--quiet"],
            **{mode: [*launch, *cli, f"train.distributed={mode}", f"output.dir={out / mode}", "--quiet"]
               for mode in ("ddp", "fsdp2")}}


def read_run(run_dir: Path) -> dict:
    """A run's figures from its ``summary.json`` (rank 0's) and ``metrics.jsonl``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    rates = [r["tokens_per_s"] for r in steps[1:]] or [steps[0]["tokens_per_s"]]  # the first step warms up
    return {"losses": [r["loss"] for r in steps], "grad_norms": [r["grad_norm"] for r in steps],
            "eval_loss": summary["eval_loss"], "tokens_per_s": statistics.median(rates),
            "peak_cuda_GiB": summary.get("peak_cuda_gb"), "peak_rss_GiB": summary["peak_rss_gb"],
            "predicted_GiB": summary.get("predicted_peak_gb"),  # the run's (rank's) plan, lowmem.planner
            "parameter_MiB_per_rank": summary.get("parameter_mb_per_rank"),
            "optimizer_state_MiB_per_rank": summary.get("optimizer_state_mb_per_rank", summary["optimizer_state_mb"])}


def trajectory(run: dict, mode: str) -> list[float]:
    """What must equal the one-process run: the global gradient norm of every step and the final eval
    loss; under FSDP2 the logged losses too (the global batch's; DDP logs rank 0's micro-batch loss)."""
    return [*run["grad_norms"], run["eval_loss"], *(run["losses"] if mode in ("one", "fsdp2") else ())]


def compare(runs: dict[str, dict]) -> dict:
    """Each launched run's largest relative difference from the one-process run (:func:`trajectory`), its
    speed against it, and ``ok``: both within ``LOSS_RTOL``, and on GPUs FSDP2's peak below DDP's (a CPU
    rehearsal's tiny model is all runtime)."""
    out = {}
    for mode in ("ddp", "fsdp2"):
        mine, one = trajectory(runs[mode], mode), trajectory(runs["one"], mode)
        diff = max(abs(a - b) / abs(b) for a, b in zip(mine, one)) if len(mine) == len(one) else float("inf")
        out[mode] = {"rel_diff": diff, "speed_vs_one": runs[mode]["tokens_per_s"] / runs["one"]["tokens_per_s"]}
    on_gpu = runs["fsdp2"]["peak_cuda_GiB"] is not None
    peak = "peak_cuda_GiB" if on_gpu else "peak_rss_GiB"
    out["fsdp2_peak_over_ddp"] = runs["fsdp2"][peak] / runs["ddp"][peak]
    out["ok"] = all(out[m]["rel_diff"] <= LOSS_RTOL for m in ("ddp", "fsdp2")) and (
        out["fsdp2_peak_over_ddp"] < 1 or not on_gpu)
    return out


def run_all(out: Path, cpu: bool, processes: int, timeout: float) -> dict:
    """The three runs in turn; their figures and :func:`compare`'s verdict."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    if cpu:  # gloo on the CPU even where GPUs are present
        env["CUDA_VISIBLE_DEVICES"] = ""
    recipe = write_recipe(out, cpu)
    runs, cmds = {}, commands(recipe, processes, out / "runs")
    for name, cmd in cmds.items():
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "Error" in line] or done.stderr.splitlines()[-1:]
            raise RuntimeError(f"{name} (rc {done.returncode}): {lines[-1] if lines else '?'}")
        runs[name] = read_run(out / "runs" / name)
    return {"processes": processes, "device": "cpu" if cpu else "cuda",
            "command": " ".join(cmds["fsdp2"][1:]), "runs": runs,
            **compare(runs)}


def too_few(count: int) -> str | None:
    """The one line a machine with fewer than 2 CUDA devices is skipped with (None: enough)."""
    if count >= 2:
        return None
    return (f"{count} CUDA device(s): FSDP2 against DDP needs at least 2 "
            f"(CPU rehearsal: python benchmarks/gpu_proof_fsdp.py OUT --cpu)")


def fsdp2(shapes, out: Path, timeout: float) -> dict:
    """The :mod:`gpu_proof` step: every CUDA device (at most 8), or skipped with :func:`too_few`'s line."""
    import torch

    count = torch.cuda.device_count() if shapes.device == "cuda" else 0
    why = too_few(count)
    if why:
        return {"not_run": why}
    return run_all(out / "fsdp2", cpu=False, processes=min(count, 8), timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="the CPU rehearsal: 2 gloo processes, a tiny model")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    args = parser.parse_args(argv)
    import torch

    processes = 2 if args.cpu else torch.cuda.device_count()
    why = too_few(processes)
    if why:
        print(f"[gpu_proof_fsdp] skipped: {why}")
        return 0
    result = run_all(args.out_dir, args.cpu, min(processes, 8), args.timeout_s)
    (args.out_dir / "fsdp2.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
