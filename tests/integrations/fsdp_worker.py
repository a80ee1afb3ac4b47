"""Processes of the FSDP2 tests (started by torchrun): several recipe runs in one launch.

``python fsdp_worker.py RUNS.json [--zo-chunk C]`` runs each ``[recipe path, [override, ...]]`` (or
``[recipe path, [override, ...], mode]``, or ``[..., mode, checkpoint]``: the checkpoint directory
``checkpoint`` is first copied alone into the run's, as if the run had been killed after it) of
``RUNS.json`` (each with its own ``output.dir``), one after the other in the same process group, then
ends the group as gloo needs (model gone, barrier, destroy). ``mode`` (default ``train``):

* ``train`` / ``resume``: train to the end, from step 0 or from the newest checkpoint;
* ``resave``: load the newest checkpoint and save it again at the same step, on this launch's
  number of processes (what a resume on another world size loaded, written back out), then resume
  from that checkpoint and train to the end;
* ``refused``: the resume must fail with a ``CheckpointError``; rank 0 writes its message to
  ``output.dir/refused.txt``.

A run ``["hf_trainer", {kwargs}]`` is a ``transformers.Trainer`` run instead (:func:`helpers.hf_trainer_run`).
``--zo-chunk C``: the zeroth-order noise's CPU generator chunk (``lowmem.optim.zo_keyed.CHUNK``), small in
the tests so that the tiny model's shards start and end inside chunks.
"""

import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist
from helpers import HF_TRAINER, hf_trainer_run

from lowmem.checkpoint import CheckpointError
from lowmem.memory import fix_malloc_threshold
from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer


def copy_alone(checkpoint: Path, into: Path) -> None:
    """Rank 0 copies ``checkpoint`` into ``into`` and renames it in place; the others wait for the name
    (the process group may not exist yet: the first trainer's accelerator starts it)."""
    final = into / checkpoint.name
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(checkpoint, into / f"copying-{checkpoint.name}")
        os.rename(into / f"copying-{checkpoint.name}", final)
    while not final.exists():
        time.sleep(0.05)


def run(path: str, overrides: list[str], mode: str = "train", checkpoint: str | None = None) -> None:
    recipe = load_recipe(path, overrides)
    if checkpoint is not None:
        copy_alone(Path(checkpoint), Path(recipe.output.dir) / "checkpoints")
    trainer = Trainer(recipe, resume=mode != "train", progress=False)
    if mode == "resave":
        trainer.restore()
        trainer.save()
    if mode != "refused":
        trainer.train()
    else:
        try:
            trainer.restore()
        except CheckpointError as err:
            if dist.get_rank() == 0:
                (Path(trainer.out) / "refused.txt").write_text(str(err))
        else:
            raise AssertionError(f"{path}: the resume was not refused")
    del trainer
    gc.collect()


def main(argv: list[str]) -> None:
    fix_malloc_threshold()  # as lowmem-train: freed tensors leave the process, so peak RSS by phase is the phase's
    if "--zo-chunk" in argv:
        import lowmem.optim.zo_keyed as zo_keyed

        zo_keyed.CHUNK = int(argv[argv.index("--zo-chunk") + 1])
    for recipe, overrides, *rest in json.loads(open(argv[0]).read()):
        if recipe == HF_TRAINER:
            hf_trainer_run(**overrides)
        else:
            run(recipe, overrides, *rest)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
