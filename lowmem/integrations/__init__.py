"""Integrations: the Hugging Face ``Trainer`` callback and ZO Trainer, and DeepSpeed combination checks.

Names are imported lazily, so ``import lowmem.integrations`` does not import transformers.
"""

from importlib import import_module

_EXPORTS = {
    "LowMemCallback": "lowmem.integrations.hf_trainer",
    "ZOTrainer": "lowmem.integrations.hf_trainer",
    "shard_for_trainer": "lowmem.integrations.hf_trainer",
    "trainer_optimizer": "lowmem.integrations.hf_trainer",
    "unwrap_optimizer": "lowmem.integrations.hf_trainer",
    "check_deepspeed_combination": "lowmem.integrations.deepspeed",
    "refuse_deepspeed_launch": "lowmem.integrations.deepspeed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lowmem.integrations' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
