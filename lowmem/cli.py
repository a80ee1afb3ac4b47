"""``lowmem-train RECIPE.yaml [key.sub=value ...] [--resume | --overwrite] [--plan] [--processes N]
[--device-memory-gb G] [--force]``;
``lowmem-train --env``: the environment report for a bug report (:mod:`lowmem.env`).

Run directory (:mod:`lowmem.run_dir`): an ``output.dir`` that already holds a run is refused unless
``--resume`` (continue it) or ``--overwrite`` (remove its files first); ``--resume`` on a finished run
says so and changes nothing (exit 0). Ctrl-C prints one line with the last complete checkpoint and
the ``--resume`` command (exit 130).

Memory plan (:mod:`lowmem.planner`): ``--plan`` prints the predicted peak and exits. Before
a run whose device memory is known (``--device-memory-gb``, ``train.device_memory_gb``,
or the GPU's own size), the plan is printed on stderr (``train.distributed: fsdp2``: one rank's, of
``--processes`` or the launcher's ``WORLD_SIZE``) and a run predicted not to fit is
refused with a one-line reason, unless ``--force``.

Expected errors (a bad recipe, a missing file, an unknown optimizer, a
corrupted checkpoint, a run that stopped itself) print one line on stderr and
exit with code 2; set ``LOWMEM_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lowmem-train", description="Memory-efficient fine-tuning from a recipe.")
    parser.add_argument("recipe", nargs="?", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.steps=10 optim.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in an output.dir that holds a run: "
                        "its metrics.jsonl, checkpoints/, model/ and summary.json are removed first (and listed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--plan", action="store_true", help="print the memory plan and exit without training")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="device to plan for (default: cuda if present)")
    parser.add_argument("--device-memory-gb", type=float, help="device memory in GiB (default: "
                        "train.device_memory_gb, else the GPU's)")
    parser.add_argument("--processes", type=int, help="train.distributed: fsdp2: plan one rank of this many "
                        "processes (default: the launcher's WORLD_SIZE, else 1)")
    parser.add_argument("--force", action="store_true", help="start a run the planner predicts will not fit")
    parser.add_argument("--env", action="store_true", help="print the environment report (for a bug report) and exit")
    args = parser.parse_intermixed_args(argv)  # flags may come before the overrides
    if args.recipe is None and not args.env:
        parser.error("the following arguments are required: recipe")
    return args


def run_device(args: argparse.Namespace) -> str:
    """The device the checks plan for: ``--device``, else the GPU if there is one, else the CPU."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_memory(recipe, args: argparse.Namespace):
    """The plan, when asked for or when the device memory is known; refuse a run that does not fit."""
    import torch

    from lowmem.planner import format_plan, plan_run, refusal

    device = run_device(args)
    capacity = args.device_memory_gb or recipe.train.device_memory_gb
    if capacity is None and device == "cuda" and torch.cuda.is_available():
        capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
    if capacity is None and not args.plan:
        return None
    if capacity is not None and capacity <= 0:
        raise ValueError(f"--device-memory-gb: must be > 0, got {capacity}")
    predicted = plan_run(recipe, device, capacity, args.processes)  # FSDP2: one rank's peak
    print(format_plan(predicted), file=sys.stdout if args.plan else sys.stderr)
    if not (args.plan or predicted.fits or args.force):
        raise ValueError(refusal(predicted))
    return predicted


def check_host(recipe, args: argparse.Namespace, predicted=None) -> None:
    """The host's predicted peak RSS in each phase (build, step, eval, save) against the RAM available now:
    printed with ``--plan`` or when the model is large enough to matter (its weights more than a quarter of
    the available RAM); a run that does not fit is refused in one line, unless ``--force``. Under a launcher
    the ``LOCAL_WORLD_SIZE`` processes on this host must fit together: each builds the whole model and holds
    its own phases, except under FSDP2, where only rank 0 reads the weights (:func:`host_together`)."""
    from lowmem.models import model_source
    from lowmem.planner import (format_phases, host_memory, host_refusal, host_together, model_config, processes_of,
                                run_host_phases, weight_bytes)
    from lowmem.steps.fsdp import loads_on_rank0

    available, total = host_memory()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the launcher's processes on this host, each this big
    try:
        config = model_config(recipe.model)
        small = 4 * local * weight_bytes(recipe, config)[0] < available
    except Exception:  # noqa: BLE001 - a model the planner cannot read: the run itself says why, in one line
        if args.plan:
            raise
        return
    if small and not args.plan:
        return
    if recipe.model.path is not None and not args.plan:
        model_source(recipe.model.path, "model.path")  # an unreachable model is said first, in its own line
    phases = run_host_phases(recipe, config, run_device(args), args.processes, predicted)  # FSDP2: one rank's
    holds_rank0 = int(os.environ.get("RANK", "0")) == int(os.environ.get("LOCAL_RANK", "0"))  # this host's first is 0
    together = host_together(phases, local, loads_on_rank0(recipe, processes_of(args.processes)), holds_rank0)
    print(format_phases(together) + (f" (the {local} processes on this host together)" if local > 1 else ""),
          file=sys.stdout if args.plan else sys.stderr)
    refused = host_refusal(together, available, total, local)
    if refused and not (args.plan or args.force):
        raise ValueError(refused)


def check_disk(recipe, args: argparse.Namespace, predicted=None) -> None:
    """The files the run writes (:mod:`lowmem.planner.disk`: the NVMe tier, the model, the checkpoints) against
    the free space where they go: printed with ``--plan``; a run that does not fit is refused in one line,
    unless ``--force``. Planned only when a bound without a plan does not fit (:func:`fits_unplanned`)."""
    from lowmem.planner import disk_needs, disk_refusal, fits_unplanned, model_config, reused_dirs, whole_run_plan

    device = run_device(args)
    try:
        config = model_config(recipe.model)
        if fits_unplanned(recipe, config) and not args.plan:
            return
        whole = whole_run_plan(recipe, device, predicted)  # the whole run's files, under FSDP2 too
    except Exception:  # noqa: BLE001 - a model the planner cannot read: the run itself says why, in one line
        if args.plan:
            raise
        return
    needs = disk_needs(recipe, whole)
    if args.plan:
        print("  disk: " + (", ".join(f"{what} {n / 2**30:.2f} GiB in {where}" for what, where, n in needs)
                            or "nothing written"))
    refused = disk_refusal(needs, reused_dirs(recipe))
    if refused and not (args.plan or args.force):
        raise ValueError(refused)


def predictor(recipe, args: argparse.Namespace):
    """``predict(model_config) -> bytes | None`` for the summary of a run the CLI did not plan beforehand: the plan
    of the loaded model's config (no second read of its files). On CPU the runtime baseline is this process's RSS
    now, before the run allocates anything: a fresh process that has imported what a run imports (the model-type
    modelling module aside, a few MiB), which is what :func:`lowmem.planner.runtime_baseline_bytes` measures in a
    subprocess (issue 24: ``predicted_peak_gb`` next to the measured peak on every run)."""
    import transformers.modeling_utils  # noqa: F401  (a run imports it: part of the baseline, ~165 MiB)

    from lowmem.memory import current_rss_bytes
    from lowmem.planner import adapter_imports

    for name in adapter_imports(recipe.model):  # the run imports them too: part of the baseline
        importlib.import_module(name)
    device = run_device(args)
    runtime = current_rss_bytes()

    def predict(config) -> int | None:
        from lowmem.planner import config_section, plan_run

        try:
            return plan_run(config_section(recipe, config), device, processes=args.processes, suggest=False,
                            runtime_bytes=runtime).peak_bytes
        except Exception as err:  # a finished run must not fail on its prediction: say so, in one line
            print(f"lowmem-train: predicted_peak_gb: not predicted ({type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})", file=sys.stderr)
            return None

    return predict


def interrupted(args: argparse.Namespace, out: str) -> str:
    """The Ctrl-C line: the last complete checkpoint and the command that continues from it. No checkpoint
    is written on the way out: the interrupt may fall inside an optimizer step (parameters half updated),
    and under several processes the ranks would stop at different steps."""
    from lowmem.checkpoint import checkpoint_step, latest_checkpoint

    latest = latest_checkpoint(out)
    if latest is None:
        return f"interrupted; {out} has no checkpoint to resume from (train.checkpoint_every); start over with " \
               f"--overwrite"
    command = shlex.join(["lowmem-train", args.recipe, *args.overrides, "--resume"])
    return f"interrupted; last complete checkpoint: step {checkpoint_step(latest)} ({latest}); continue with: {command}"


def run(args: argparse.Namespace) -> dict | None:
    from lowmem.recipe import load_recipe
    from lowmem.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    predicted = check_memory(recipe, args)
    check_host(recipe, args, predicted)
    check_disk(recipe, args, predicted)
    if args.plan:
        return None
    try:
        return train(recipe, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
                     predicted_peak_bytes=None if predicted is None else predicted.peak_bytes,
                     predict=predictor(recipe, args) if predicted is None else None)
    except KeyboardInterrupt:
        raise Interrupted(interrupted(args, recipe.output.dir)) from None


class Interrupted(Exception):
    """Ctrl-C during a run; the message is the line to print."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.env:
        from lowmem.env import main as env_report

        return env_report()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lowmem.memory import fix_malloc_threshold

    fix_malloc_threshold()  # freed tensors go back to the OS, as the planner assumes (issue #8)
    from lowmem.run_dir import RunComplete
    from lowmem.trainer import TrainingStopped

    main_rank = os.environ.get("RANK", "0") == "0"  # one line, one summary under accelerate launch
    try:
        summary = run(args)
    except (RunComplete, Interrupted) as done:
        if main_rank:
            print(f"lowmem-train: {done}", file=sys.stderr)
        return 0 if isinstance(done, RunComplete) else 130
    except KeyboardInterrupt:  # before the run started (loading, planning): nothing to resume
        print("lowmem-train: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, TrainingStopped) as err:
        if os.environ.get("LOWMEM_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lowmem-train: error: {message}", file=sys.stderr)
        return 2
    if summary is not None and main_rank:
        print(json.dumps(summary, indent=2))
    end_process_group()
    return 0


def end_process_group() -> None:
    """Under a launcher: once every rank is here, end the process group, the run's objects gone first (a gloo
    group alive at exit can abort the process, "terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
