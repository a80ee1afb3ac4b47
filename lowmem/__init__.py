"""lowmem: memory-efficient LLM fine-tuning.

Public API::

    lowmem.create_optimizer(model, "apollo_mini", lr=1e-3)   # any registered optimizer
    lowmem.load_recipe("recipes/default.yaml")               # typed, validated recipe
    lowmem.train(recipe)                                     # the lowmem-train loop
"""

from lowmem.optim.registry import create_optimizer

__all__ = ["create_optimizer"]
__version__ = "0.1.0"
