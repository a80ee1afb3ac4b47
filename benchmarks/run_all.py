"""Reproduce benchmarks/RESULTS.md with one command.

Runs every ``benchmarks/bench_*.py`` (each writes ``results/<name>.md`` with the machine,
versions, date and exact command on top; ``--quick`` is passed to scripts that accept it),
trains a few short runs of the offline default for the loss-curve figure, draws the figures
(:mod:`plots`), and assembles ``RESULTS.md`` from ``results/*.md`` in :data:`ORDER` (others
after, by name). CPU tables come out on any machine; GPU sections where a GPU is present
(``bench_zo2.py --gpu`` and ``gpu_proof.py``, see :func:`commands`).

Usage: python benchmarks/run_all.py [--quick] [--only bench_peak_memory ...] [--no-run]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import plots  # noqa: E402
from _common import RESULTS_DIR, machine  # noqa: E402

ORDER = ["default", "bos", "packing", "sft_recipe", "quality", "quality_fp32", "quality_val_fp32", "quantized",
         "quantized_planned",
         "peak_memory", "planner_table",
         "optim_state", "optim_step", "optim_step_interleaved", "optim_step_8bit", "bench_adamw8bit",
         "layerwise_memory", "wta_crs",
         "bench_zo", "bench_zo_quality", "bench_zo_quality_1000", "bench_zo_noise", "bbc_topic", "zo2", "fuyou_cpu",
         "largest", "step_peak",
         "fsdp", "zo_keyed", "streamed_build", "zo2_gpu", "peak_memory_cuda", "fuyou_gpu", "gpu_proof"]
LOSS_RUNS = {"adamw": ["optim.name=adamw"], "apollo_mini": ["optim.name=apollo_mini"],
             "mezo": ["optim.name=mezo", "optim.lr=1e-6", "train.mixed_precision=no"]}


GPU_RUNS = {"bench_zo2": ["--gpu"]}  # scripts run a second time, with these arguments, on a GPU
MORE_RUNS = {"bench_optim_step": ["--8bit"]}  # scripts run a second time, with these arguments, anywhere


def commands(quick: bool, only: list[str], cuda: bool) -> list[list[str]]:
    """The benchmark commands: every ``bench_*.py`` (``--quick`` where accepted) and the second runs of
    :data:`MORE_RUNS`; on a GPU also the GPU runs of :data:`GPU_RUNS` and the GPU proof (``gpu_proof.py``: kernels, 8-bit AdamW on 1B parameters,
    a Llama-3-8B step against the planner, ZO2 on OPT-30B), whose section lands in ``results/``."""
    cmds = []
    for script in sorted(HERE.glob("bench_*.py")):
        if only and script.stem not in only:
            continue
        cmds.append([sys.executable, str(script)] + (["--quick"] if quick and "--quick" in script.read_text() else []))
        if script.stem in MORE_RUNS:
            cmds.append([sys.executable, str(script), *MORE_RUNS[script.stem]])
        if cuda and script.stem in GPU_RUNS:
            cmds.append([sys.executable, str(script), *GPU_RUNS[script.stem]])
    if cuda and (not only or "gpu_proof" in only):
        cmds.append([sys.executable, str(HERE / "gpu_proof.py"), str(RESULTS_DIR)])
    return cmds


def run_benchmarks(quick: bool, only: list[str]) -> list[str]:
    import torch

    failed = []
    for cmd in commands(quick, only, torch.cuda.is_available()):
        print("::", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=HERE).returncode:
            failed.append(" ".join(Path(c).name for c in cmd[1:]))
    return failed


def loss_runs(quick: bool) -> list[Path]:
    """Short runs of recipes/default.yaml (metrics.jsonl) for the loss-curve figure."""
    dirs = []
    for name, overrides in LOSS_RUNS.items():
        out = HERE.parent / "runs" / f"bench_loss_{name}"
        steps = 10 if quick else 30
        cmd = [sys.executable, "-m", "lowmem.cli", str(HERE.parent / "recipes" / "default.yaml"), *overrides,
               f"train.steps={steps}", "train.checkpoint_every=0", f"output.dir={out}", "output.save_model=false",
               "--quiet", "--overwrite"]
        if subprocess.run(cmd).returncode == 0:
            dirs.append(out)
    return dirs


def assemble(figures: list[Path], command: str) -> Path:
    sections = {p.stem: p.read_text().strip() for p in RESULTS_DIR.glob("*.md")}
    names = [n for n in ORDER if n in sections] + sorted(n for n in sections if n not in ORDER)
    head = (f"# lowmem benchmark results\n\nAssembled by `{command}` on {machine()}.\n"
            "Each section gives the machine, date and exact command that produced it.\n")
    figs = "".join(f"\n![{f.stem}](results/{f.name})\n" for f in figures)
    text = head + figs + "".join(f"\n{sections[n]}\n" for n in names)
    path = HERE / "RESULTS.md"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="faster pass (scripts that support it)")
    parser.add_argument("--only", nargs="*", default=[], help="run only these bench_* scripts (by stem)")
    parser.add_argument("--no-run", action="store_true", help="only assemble RESULTS.md and figures")
    args = parser.parse_args()
    failed = [] if args.no_run else run_benchmarks(args.quick, args.only)
    runs = [] if args.no_run else loss_runs(args.quick)
    figures = plots.make_all(runs or sorted(HERE.parent.glob("runs/bench_loss_*")))
    path = assemble(figures, "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    print(f"wrote {path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
