"""Processes of the FSDP2 tests (started by torchrun): several recipe runs in one launch.

``python fsdp_worker.py RUNS.json [--resume] [--zo-chunk C]`` trains each ``[recipe path, [override, ...]]`` of
``RUNS.json`` (each with its own ``output.dir``), one after the other in the same process group,
then ends the group as gloo needs (model gone, barrier, destroy). A run ``["hf_trainer", {kwargs}]``
is a ``transformers.Trainer`` run instead (:func:`helpers.hf_trainer_run`). ``--zo-chunk C``: the
zeroth-order noise's CPU generator chunk (``lowmem.optim.zo_keyed.CHUNK``), small in the tests so that
the tiny model's shards start and end inside chunks.
"""

import gc
import json
import sys

import torch.distributed as dist
from helpers import HF_TRAINER, hf_trainer_run

from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer


def main(argv: list[str]) -> None:
    if "--zo-chunk" in argv:
        import lowmem.optim.zo_keyed as zo_keyed

        zo_keyed.CHUNK = int(argv[argv.index("--zo-chunk") + 1])
    for recipe, overrides in json.loads(open(argv[0]).read()):
        if recipe == HF_TRAINER:
            hf_trainer_run(**overrides)
            continue
        trainer = Trainer(load_recipe(recipe, overrides), resume="--resume" in argv, progress=False)
        trainer.train()
        del trainer
        gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
