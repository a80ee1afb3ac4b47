"""Optimizer registry and ``create_optimizer``.

Every optimizer is a plain ``torch.optim.Optimizer`` registered under a recipe
name with :func:`register`. Modules are imported lazily on first use, so an
optional dependency is only needed by the optimizer that uses it.

``create_optimizer(model, name, **hparams)`` splits the model's parameters with
the target rule (:mod:`lowmem.optim.targets`) into param groups:

* ``targets``  -- 2-D ``nn.Linear`` weights inside the blocks, with the
  method's per-group keys (``rank``, ``update_proj_gap``, ``scale`` ...), the
  same keys the reference packages (galore-torch, apollo-torch) read;
* ``decay``    -- other matrices (embeddings, ``lm_head``): plain AdamW rule;
* ``no_decay`` -- biases and norm weights: plain AdamW rule, ``weight_decay=0``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowmem.optim.targets import split_parameters

# name -> module that registers it (imported lazily)
_MODULES: dict[str, str] = {
    "adamw": "lowmem.optim.adamw",
    "galore_adamw": "lowmem.optim.galore",
    "apollo": "lowmem.optim.apollo",
    "apollo_mini": "lowmem.optim.apollo",
    "frugal": "lowmem.optim.frugal",
    "adamw8bit": "lowmem.optim.adamw8bit",
    "sgd8bit": "lowmem.optim.adamw8bit",
    "mezo": "lowmem.optim.mezo",
    "zo_adamu": "lowmem.optim.zo_adamu",
    "sgd_sai": "lowmem.optim.sgd_sai",
    "swan": "lowmem.optim.swan",
    "sinkgd": "lowmem.optim.sinkgd",
}


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one registered optimizer."""

    name: str
    cls: type[torch.optim.Optimizer]
    target_keys: tuple[str, ...] = ()  # hparams that belong to the target group only
    target_defaults: dict[str, Any] = field(default_factory=dict)  # e.g. APOLLO-Mini's rank=1
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides of cls defaults
    zeroth_order: bool = False
    # True: one group per split part is not wanted (ZO methods take all params in order)
    all_params_one_rule: bool = False


_SPECS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in _SPECS and _SPECS[spec.name].cls is not spec.cls:
        raise ValueError(f"optimizer name {spec.name!r} registered twice")
    _SPECS[spec.name] = spec
    return spec


def available() -> list[str]:
    return sorted(_MODULES)


def get_spec(name: str) -> OptimizerSpec:
    if name not in _MODULES:
        raise ValueError(f"optim.name: unknown optimizer {name!r}; choose one of {', '.join(available())}")
    if name not in _SPECS:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as err:
            raise ValueError(f"optim.name: {name!r} needs a missing package ({err.name}); "
                             f"install it, e.g. pip install 'lowmem[gpu]'") from err
    if name not in _SPECS:
        raise ValueError(f"optim.name: {name!r} is not implemented in this version")
    return _SPECS[name]


def accepted_hparams(name: str) -> set[str]:
    """Keyword arguments ``create_optimizer`` accepts for ``name``."""
    spec = get_spec(name)
    sig = inspect.signature(spec.cls.__init__)
    keys = {k for k in sig.parameters if k not in ("self", "params")}
    return keys | set(spec.target_keys)


def check_hparams(name: str, hparams: dict[str, Any], where: str = "optim.args") -> None:
    unknown = sorted(set(hparams) - accepted_hparams(name))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not an argument of optimizer {name!r} "
                         f"(accepted: {', '.join(sorted(accepted_hparams(name)))})")


def build_param_groups(model: nn.Module, spec: OptimizerSpec, target_hparams: dict[str, Any],
                       weight_decay: float | None, target_modules: list[str] | None) -> list[dict]:
    split = split_parameters(model, target_modules)
    groups: list[dict] = []
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    if spec.target_keys:
        if split.targets:
            groups.append({"params": [p for _, p in split.targets], "param_names": [n for n, _ in split.targets],
                           **spec.target_defaults, **target_hparams, **wd})
        plain = split.decay
    else:
        plain = split.targets + split.decay
    if plain:
        groups.append({"params": [p for _, p in plain], "param_names": [n for n, _ in plain], **wd})
    if split.no_decay:
        groups.append({"params": [p for _, p in split.no_decay], "param_names": [n for n, _ in split.no_decay],
                       "weight_decay": 0.0})
    if not groups:
        raise ValueError("model: no trainable parameters")
    return groups


def create_optimizer(model: nn.Module, name: str, *, target_modules: list[str] | None = None,
                     **hparams: Any) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``model``'s trainable parameters.

    >>> opt = create_optimizer(model, "apollo_mini", lr=1e-3)
    """
    spec = get_spec(name)
    check_hparams(name, hparams, where="create_optimizer")
    hparams = {**spec.defaults, **hparams}
    target_hparams = {k: hparams.pop(k) for k in spec.target_keys if k in hparams}
    weight_decay = hparams.pop("weight_decay", None)
    groups = build_param_groups(model, spec, target_hparams, weight_decay, target_modules)
    if weight_decay is not None:
        hparams["weight_decay"] = weight_decay
    return spec.cls(groups, **hparams)


def is_zeroth_order(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "zeroth_order", False))

