"""Optimizer registry and ``create_optimizer``.

Every optimizer is a plain ``torch.optim.Optimizer`` registered under a recipe
name with :func:`register`, in its own module (:data:`_MODULES` lists the modules, imported on the
first look-up). Optional dependencies are imported inside the optimizer that uses them.

``create_optimizer(model, name, **hparams)`` splits the model's parameters with
the target rule (:mod:`lowmem.optim.targets`) into param groups:

* ``targets``  -- 2-D ``nn.Linear`` weights inside the blocks, with the
  method's per-group keys (``rank``, ``update_proj_gap``, ``scale`` ...), the
  same keys the reference packages (galore-torch, apollo-torch) read;
* ``decay``    -- other matrices (embeddings, ``lm_head``): plain AdamW rule;
* ``no_decay`` -- biases and norm weights: plain AdamW rule, ``weight_decay=0``.

Typed arguments, one definition each (:mod:`lowmem.optim.args`). An optimizer's constructor
keywords are declared once, in its signature: the annotations carry types and ranges
(``NonNegative``, ``Betas``, ``Count``, ``StateBits``, ``Literal[...]``) and the defaults are the
signature's. The ``@typed`` constructor validates every call with the pydantic model built from
that signature (direct Python use); the target group's keys are a ``GroupArgs`` model
(``spec.group``) that the constructor checks on each group. :func:`args_model` joins the two into
the model of ``create_optimizer``'s keywords, which is also the model of the recipe's
``optim.args``: the recipe validates it when it loads, before any model or tokenizer is read, so
an unknown name, a bad type or a value out of range is refused in one line naming
``optim.args.<name>`` (``optim.lr`` / ``optim.weight_decay`` for those two). Checks that need the
parameters (2-D targets) or tie several arguments together (ZO-AdaMU's ``t1 < t2``) stay in the
constructor body, with the same naming.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import create_model
from torch import nn

from lowmem.optim.args import NOT_IN_ARGS, GroupArgs, signature_model, validate
from lowmem.optim.targets import split_parameters

# the modules that register optimizers (each name is written once, in its module's register call);
# imported on the first look-up, so ``import lowmem`` stays light
_MODULES = ("lowmem.optim.adamw", "lowmem.optim.galore", "lowmem.optim.apollo", "lowmem.optim.frugal",
            "lowmem.optim.adamw8bit", "lowmem.optim.mezo", "lowmem.optim.zo_adamu", "lowmem.optim.sgd_sai",
            "lowmem.optim.swan", "lowmem.optim.sinkgd")


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one registered optimizer."""

    name: str
    cls: type[torch.optim.Optimizer]
    group: type[GroupArgs] | None = None  # typed keys of the target group (rank, update_proj_gap ...)
    types: dict[str, Any] = field(default_factory=dict)  # annotations for a class we do not own (torch's AdamW)
    zeroth_order: bool = False

    @property
    def target_keys(self) -> tuple[str, ...]:
        """Keyword arguments that belong to the target group only."""
        return tuple(self.group.model_fields) if self.group else ()


_SPECS: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    if spec.name in _SPECS and _SPECS[spec.name].cls is not spec.cls:
        raise ValueError(f"optimizer name {spec.name!r} registered twice")
    _SPECS[spec.name] = spec
    return spec


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"optim.name: {module} needs a missing package ({err.name}); install it, "
                             f"e.g. pip install 'lowmem[gpu]'") from err


def available() -> list[str]:
    _load_all()
    return sorted(_SPECS)


def get_spec(name: str) -> OptimizerSpec:
    if name not in _SPECS:
        _load_all()
    if name not in _SPECS:
        raise ValueError(f"optim.name: unknown optimizer {name!r}; choose one of {', '.join(available())}")
    return _SPECS[name]


_ARGS: dict[str, type[GroupArgs]] = {}


def args_model(name: str) -> type[GroupArgs]:
    """The typed keywords of ``create_optimizer(model, name, ...)`` (and the recipe's ``optim.args``):
    the constructor's signature plus the target group's keys."""
    if name not in _ARGS:
        spec = get_spec(name)
        model = signature_model(inspect.unwrap(spec.cls.__init__), spec.types)
        if spec.group is not None:
            model = create_model(f"{name}_args", __base__=(model, spec.group))
        _ARGS[name] = model
    return _ARGS[name]


def accepted_hparams(name: str) -> set[str]:
    """Keyword arguments ``create_optimizer`` accepts for ``name``."""
    return set(args_model(name).model_fields)


def check_hparams(name: str, hparams: dict[str, Any]) -> None:
    """Refuse an unknown name, a bad type or a value out of range in one line naming the field."""
    validate(args_model(name), hparams, name)


def build_param_groups(model: nn.Module, spec: OptimizerSpec, target_hparams: dict[str, Any],
                       weight_decay: float | None, target_modules: list[str] | None) -> list[dict]:
    split = split_parameters(model, target_modules)
    groups: list[dict] = []
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    if spec.target_keys:
        if split.targets:
            groups.append({"params": [p for _, p in split.targets], "param_names": [n for n, _ in split.targets],
                           **dict(spec.group()), **target_hparams, **wd})
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
    check_hparams(name, hparams)
    hparams = dict(hparams)
    target_hparams = {k: hparams.pop(k) for k in spec.target_keys if k in hparams}
    weight_decay = hparams.pop("weight_decay", None)
    groups = build_param_groups(model, spec, target_hparams, weight_decay, target_modules)
    if weight_decay is not None:
        hparams["weight_decay"] = weight_decay
    return spec.cls(groups, **hparams)


def is_zeroth_order(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "zeroth_order", False))



def args_reference() -> list[str]:
    """Markdown lines: each optimizer's ``optim.args`` with defaults and ranges (the README's reference)."""
    from typing import Literal, get_args, get_origin

    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    lines = ["**`optim.args`** per `optim.name` (typed: checked when the recipe loads; target-group keys first)",
             "", "| `optim.name` | its `optim.weight_decay` | arguments: default (range) |", "|---|---|---|"]
    for name in available():
        items, fields = [], args_model(name).model_fields
        for key, f in fields.items():
            if key in NOT_IN_ARGS:  # optim.lr, optim.weight_decay; set by the trainer
                continue
            limits = [f"{marks[k]} {getattr(m, k)}" for m in f.metadata for k in marks if hasattr(m, k)]
            if get_origin(f.annotation) is Literal:
                limits.append(" / ".join(map(str, get_args(f.annotation))))
            items.append(f"`{key}`: `{f.default!r}`" + (f" ({', '.join(limits)})" if limits else ""))
        lines.append(f"| `{name}` | `{fields['weight_decay'].default}` | {'; '.join(items)} |")
    return lines
