"""One data-parallel process of a lowmem recipe run (started by torchrun or accelerate launch).

``python ddp_worker.py RECIPE.yaml [key=value ...] [--resume]`` trains like ``lowmem-train`` and then
writes this rank's final weights to ``<output.dir>/rank<r>.safetensors``, so a test can check
that every replica ends with the same weights.
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer


def main(argv: list[str]) -> None:
    recipe = load_recipe(argv[0], [a for a in argv[1:] if a != "--resume"])
    trainer = Trainer(recipe, resume="--resume" in argv, progress=False)
    trainer.train()
    weights = trainer.accelerator.unwrap_model(trainer.run.model).state_dict()
    rank = trainer.accelerator.process_index
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
              str(Path(recipe.output.dir) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:])
