"""The disk a run will write, checked against the free space before it starts.

An offloaded run's NVMe tier is written at build time and is as large as everything its placement leaves out
of the host budget: a Llama-3-8B-shape first-order run with AdamW puts 32 GB of fp32 masters and 64 GB of
states there. Found out by the disk filling up half-way, such a run dies late and leaves a full disk; a
checkpoint that does not fit fails the same way after hours of training. From a step's plan
(:mod:`lowmem.planner.plan`; ``P`` the weights in the training dtype, ``P32`` in fp32, ``S`` the optimizer
state)::

    nvme        : the plan's ``nvme_files``: first order, the blocks' (and moved embeddings') fp32 masters and
                  states beyond offload.host_memory_budget_gb; ZO2, the blocks' host copies beyond it
    model       : P, when output.save_model (LoRA: the trained tensors ``P_t``, the plan's ``trained``: the
                  adapters and what model.trainable trains beside them)
    checkpoints : min(keep_checkpoints + 1, steps // checkpoint_every) x (P, or P32 first-order offloaded
                  (its checkpoints hold the fp32 masters), LoRA P_t) + S) -- the newest is written whole
                  before the oldest is removed

Files the run rewrites or rotates out count as free (:func:`reused_dirs`: the NVMe tier's, and a resumed run's
checkpoints and model). Directories on one filesystem share its free space; each filesystem's total is compared
with what it has free.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lowmem.dtypes import float_dtype
from lowmem.planner.phases import weight_bytes
from lowmem.recipe import Recipe


def disk_needs(recipe: Recipe, step_plan) -> list[tuple[str, str, int]]:
    """[(what, directory, bytes)] the run will write (see the module docstring); empty entries left out."""
    train, out = recipe.train, recipe.output.dir
    # LoRA: the adapter file holds the trained tensors (adapters, and modules model.trainable trains beside them)
    weights = step_plan.totals.get("trained" if recipe.model.lora is not None else "weights", 0)
    needs = [("the NVMe tier", recipe.offload.nvme_dir, step_plan.totals.get("nvme_files", 0))]
    if recipe.output.save_model:
        needs.append(("the model", out, weights))
    if train.checkpoint_every and train.steps >= train.checkpoint_every:
        size = float_dtype(recipe.model.dtype).itemsize
        masters = weights * 4 // size if step_plan.host_parts else weights  # first order offloaded: fp32 masters
        count = min(train.keep_checkpoints + 1, train.steps // train.checkpoint_every)
        needs.append((f"{count} checkpoint{'s' * (count > 1)}", out,
                      count * (masters + step_plan.totals.get("optimizer_states", 0))))
    return [(what, where, n) for what, where, n in needs if where is not None and n > 0]


def fits_unplanned(recipe: Recipe, config) -> bool:
    """Whether 16 bytes a parameter (an fp32 copy and two fp32 states, more than any one thing written takes)
    for each of the NVMe tier, the model and the checkpoints fits the least free space among their places:
    then no plan is needed (the check of a small run costs no trace)."""
    train = recipe.train
    params = weight_bytes(recipe, config)[0] // float_dtype(recipe.model.dtype).itemsize
    places = [d for d in (recipe.offload.nvme_dir if recipe.offload.enabled else None, recipe.output.dir) if d]
    written = len(places) + (min(train.keep_checkpoints + 1, train.steps // train.checkpoint_every)
                             if train.checkpoint_every else 0)
    return 16 * params * written <= min(shutil.disk_usage(existing(d)).free for d in places)


def existing(path: str | Path) -> Path:
    """``path`` or its nearest ancestor that exists (where its files will go)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def reused_dirs(recipe: Recipe) -> list[Path]:
    """Directories whose files the run rewrites or rotates out, so their space counts as free: the NVMe tier's
    (its block files rewritten in place) and, in the run directory, the checkpoints and the model (a resumed
    run's older checkpoints are removed as new ones complete; the model is replaced)."""
    out = Path(recipe.output.dir)
    dirs = [out / "checkpoints", out / "model"]
    return ([Path(recipe.offload.nvme_dir)] if recipe.offload.enabled and recipe.offload.nvme_dir else []) + dirs


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it is not a directory)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def disk_refusal(needs: list[tuple[str, str, int]], reused: list[Path] = ()) -> str | None:
    """One line refusing a run whose files exceed the free space of a filesystem they go to (with the files
    in ``reused`` on it, :func:`reused_dirs`), or None."""
    by_fs: dict[int, list[tuple[str, str, int]]] = {}
    room: dict[int, int] = {}
    for what, where, n in needs:
        base = existing(where)
        dev = os.stat(base).st_dev
        by_fs.setdefault(dev, []).append((what, where, n))
        room[dev] = shutil.disk_usage(base).free
    for path in reused:
        dev = os.stat(existing(path)).st_dev
        if dev in room:
            room[dev] += tree_bytes(path)
    for dev, items in by_fs.items():
        total = sum(n for *_, n in items)
        if total > room[dev]:
            listed = ", ".join(f"{what} {n / 2**30:.1f} GiB in {where}" for what, where, n in items)
            return (f"disk: the run writes {total / 2**30:.1f} GiB ({listed}) to a filesystem with "
                    f"{room[dev] / 2**30:.1f} GiB free; free space, point offload.nvme_dir or output.dir at a larger "
                    f"disk, raise offload.host_memory_budget_gb, or pass --force to run anyway")
    return None
