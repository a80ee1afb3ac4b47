"""lowmem: memory-efficient LLM fine-tuning.

Public API::

    lowmem.create_optimizer(model, "apollo_mini", lr=1e-3)   # any registered optimizer
    lowmem.load_recipe("recipes/default.yaml")               # typed, validated recipe
    lowmem.train(recipe)                                     # the lowmem-train loop
    lowmem.LowMemCallback(layerwise=..., wta_crs_keep_ratio=...)  # for transformers.Trainer
    lowmem.ZOTrainer(...)                                    # transformers.Trainer for MeZO / ZO-AdaMU
    lowmem.shard_for_trainer(model, training_args)           # FSDP2 for transformers.Trainer

Everything but ``create_optimizer`` is imported on first use, so ``import lowmem`` stays light
(no transformers, no accelerate).
"""

from importlib import import_module

from lowmem.optim.registry import create_optimizer

_LAZY = {
    "LowMemCallback": "lowmem.integrations.hf_trainer",
    "ZOTrainer": "lowmem.integrations.hf_trainer",
    "shard_for_trainer": "lowmem.integrations.hf_trainer",
    "load_recipe": "lowmem.recipe",
    "train": "lowmem.trainer",
}

__all__ = ["create_optimizer", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lowmem' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)
