"""A run directory holds one run: what a new run, ``--resume`` and ``--overwrite`` may do with it (issue 24).

A directory already holds a run when any of :data:`RUN_FILES` is there. Before anything is built:

* no ``--resume``: a directory holding a run is refused (one line: ``--resume``, ``--overwrite`` or another
  ``output.dir``), so a rerun never mixes its metrics and checkpoints with the previous run's;
  ``--overwrite`` removes the previous run's :data:`RUN_FILES` (and says so), nothing else there;
* ``--resume`` on a finished run (``summary.json`` with ``steps >= train.steps``, and ``model/`` when the run
  saves one: the summary is written first, so a run killed while saving its model is resumed and saves it
  again): :class:`RunComplete`, and nothing is touched (a larger ``train.steps`` continues it from its last checkpoint);
* ``--resume`` with no complete checkpoint: refused, instead of silently starting over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lowmem.checkpoint import latest_checkpoint

RUN_FILES = ("metrics.jsonl", "checkpoints", "model", "summary.json")  # what a run writes into output.dir


class RunDirError(ValueError):
    """The run directory does not allow what was asked; the message is one line naming it."""


class RunComplete(Exception):
    """``--resume`` on a run that already reached ``train.steps``: nothing to do, nothing changed."""


def finished_steps(out: Path) -> int | None:
    """Steps of the finished run in ``out`` (its ``summary.json``), or None."""
    try:
        return int(json.loads((out / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_run_dir(out: Path, *, resume: bool, overwrite: bool, steps: int, save_model: bool = False) -> None:
    """Refuse what would mix or lose runs in ``out`` (see the module docstring); changes nothing.
    ``save_model``: the run writes ``model/`` (after ``summary.json``): a run killed in between is not complete."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in output.dir, --overwrite replaces it: give one of them")
    if resume:
        done = finished_steps(out)
        if done is not None and done >= steps and (not save_model or (out / "model").is_dir()):
            raise RunComplete(f"{out}: the run is already complete ({done} steps, train.steps={steps}); nothing "
                              f"changed (raise train.steps to continue it from its last checkpoint)")
        if latest_checkpoint(out) is None:
            raise RunDirError(f"--resume: no complete checkpoint in {out / 'checkpoints'}; start over with "
                              f"--overwrite, or set another output.dir")
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        raise RunDirError(f"output.dir {out} already holds a run ({', '.join(found)}): continue it with --resume, "
                          f"replace it with --overwrite, or set another output.dir")


def clear_run(out: Path) -> list[str]:
    """``--overwrite``: remove the previous run's files in ``out`` (only :data:`RUN_FILES`); returns their names."""
    removed = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed

