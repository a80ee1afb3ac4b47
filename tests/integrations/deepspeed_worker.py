"""Train the tests' tiny Llama in a ``transformers.Trainer`` under DeepSpeed, one process.

``python deepspeed_worker.py OUT ZERO_JSON OPTIMIZER`` builds the optimizer through
``lowmem.integrations.trainer_optimizer`` (lr 1e-2), runs the tests' default
``TrainingArguments`` with ``ZERO_JSON`` as the ``zero_optimization`` section (e.g.
``{"stage": 2}``), and saves the final weights to ``OUT/weights.safetensors``. A refused
combination prints one line and exits with 2.
It runs in its own process because DeepSpeed initialises torch.distributed for good.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.* imports

from safetensors.torch import save_file  # noqa: E402

from tests.conftest import _tiny_config  # noqa: E402
from tests.integrations.helpers import TokenDataset, trainer_arguments  # noqa: E402


def main(out: str, zero: dict, name: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from lowmem.integrations import LowMemCallback, trainer_optimizer

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        os.environ.setdefault(key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config())
    # zero_force_ds_cpu_optimizer=False: DeepSpeed otherwise refuses a client optimizer with offload
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "zero_force_ds_cpu_optimizer": False,
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    trainer = Trainer(model=model, args=trainer_arguments(out, deepspeed=config), train_dataset=TokenDataset(),
                      optimizer_cls_and_kwargs=trainer_optimizer(name, lr=1e-2), callbacks=[LowMemCallback()])
    try:
        trainer.train()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(list(model.parameters())):  # ZeRO-3 keeps only partitions outside this
        weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(weights, str(Path(out) / "weights.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]))
