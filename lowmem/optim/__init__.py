"""Optimizers: a registry of plain ``torch.optim.Optimizer`` classes (see :mod:`lowmem.optim.registry`)."""

from lowmem.optim.registry import available, create_optimizer, get_spec, is_zeroth_order, register

__all__ = ["available", "create_optimizer", "get_spec", "is_zeroth_order", "register"]
