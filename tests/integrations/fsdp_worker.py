"""Processes of the FSDP2 tests (started by torchrun): several recipe runs in one launch.

``python fsdp_worker.py RUNS.json [--resume]`` trains each ``[recipe path, [override, ...]]`` of
``RUNS.json`` (each with its own ``output.dir``), one after the other in the same process group,
then ends the group as gloo needs (model gone, barrier, destroy). A run ``["hf_trainer", {kwargs}]``
is a ``transformers.Trainer`` run instead (:func:`helpers.hf_trainer_run`).
"""

import gc
import json
import sys

import torch.distributed as dist
from helpers import HF_TRAINER, hf_trainer_run

from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer


def main(argv: list[str]) -> None:
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
