"""Train the tests' tiny Llama in a ``transformers.Trainer`` under DeepSpeed, one process.

``python deepspeed_worker.py OUT STAGE OPTIMIZER`` builds the optimizer through
``lowmem.integrations.trainer_optimizer`` (lr 1e-2), runs the tests' default
``TrainingArguments`` with a ZeRO-``STAGE`` config, and saves the final weights to
``OUT/weights.safetensors``. A refused combination prints one line and exits with 2.
It runs in its own process because DeepSpeed initialises torch.distributed for good.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.* imports

from safetensors.torch import save_file  # noqa: E402

from tests.conftest import _tiny_config  # noqa: E402
from tests.integrations.helpers import TokenDataset, trainer_arguments  # noqa: E402


def main(out: str, stage: int, name: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from lowmem.integrations import LowMemCallback, trainer_optimizer

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config())
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    trainer = Trainer(model=model, args=trainer_arguments(out, deepspeed=config), train_dataset=TokenDataset(),
                      optimizer_cls_and_kwargs=trainer_optimizer(name, lr=1e-2), callbacks=[LowMemCallback()])
    try:
        trainer.train()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(Path(out) / "weights.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
