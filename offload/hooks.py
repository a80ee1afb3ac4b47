"""Driving the blocks of a Hugging Face causal LM for ZO2, without copying model code.

ZO2 (Wang et al., 2025, arXiv 2503.12668, §3.3) runs the ``+eps z`` and ``-eps z`` forwards *together*
so that each block is uploaded once per step. We do it with the model's own
``forward`` on a doubled batch ``[x; x]`` (first half: branch +, second half:
branch -) and an instance-level ``forward`` override on each *unit*:

* every decoder block (the ``ModuleList`` found by :func:`block_container`), and
* every top-most module outside the blocks that holds parameters (embeddings,
  positional embeddings, final norm, ``lm_head``...).

A unit called with the doubled batch calls its original forward twice, once per
half -- tensors of rank >= 2 whose first dimension is ``2B`` are sliced, others
(rotary tables, ``position_ids`` of batch 1, masks of batch 1) pass unchanged --
and the two outputs are concatenated again (an output of batch 1 is broadcast to
``B`` first). Between the two calls the :class:`Visitor` (the engine) changes the
unit's weights from ``theta + eps z`` to ``theta - eps z``. So each half sees
exactly the per-branch weights, the block computes on ``B`` rows as in memory, and
code between units (residual adds, mask building) is per-sample. Outside a dual
forward (evaluation) a unit calls its forward once, still through the visitor so
that an offloaded block is streamed in.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from lowmem.offload.streamed import ForwardOverrides, model_units  # model_units: also imported from here by the planner

Run = Callable[[], Any]


class Visitor(Protocol):
    def visit(self, key: tuple[str, int], runs: list[Run]) -> list[Any]:
        """Run unit ``key`` (``("block", i)`` or ``("unit", k)``): ``runs`` has one entry
        (plain forward) or two (branch +, branch -); return their outputs in order."""


def _split(obj: Any, half: int, b: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[half * b:(half + 1) * b] if obj.dim() >= 2 and obj.shape[0] == 2 * b else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_split(o, half, b) for o in obj)
    if isinstance(obj, dict):
        return {k: _split(v, half, b) for k, v in obj.items()}
    return obj


def _join(a: Any, b_out: Any, b: int, where: str) -> Any:
    if isinstance(a, torch.Tensor):
        if a.dim() == 0 or a.shape[0] not in (1, b):
            raise ValueError(f"model: {where} returned a tensor of shape {tuple(a.shape)} without a batch "
                             f"dimension of {b}; ZO2 cannot split it")
        size = (b,) + tuple(a.shape[1:])
        return torch.cat([a.expand(size), b_out.expand(size)])
    if isinstance(a, (tuple, list)):
        return type(a)(_join(x, y, b, where) for x, y in zip(a, b_out))
    if isinstance(a, dict):
        return {k: _join(v, b_out[k], b, where) for k, v in a.items()}
    return a


class ModelDriver:
    """Installs the unit overrides on ``model``; while ``half_batch`` is ``B`` (a dual forward),
    units split a ``2B`` batch into its two branches."""

    def __init__(self, model: nn.Module, visitor: Visitor):
        self.blocks, self.units = model_units(model)
        self.visitor = visitor
        self.half_batch: int | None = None  # B during a dual forward, else None
        self.overrides = ForwardOverrides()
        for i, block in enumerate(self.blocks):
            self.overrides.install(block, self._forward_of(("block", i), f"block {i}"))
        for k, (name, module) in enumerate(self.units):
            self.overrides.install(module, self._forward_of(("unit", k), name))

    def _forward_of(self, key: tuple[str, int], where: str) -> Callable[[Callable], Callable]:
        def make(original: Callable) -> Callable:
            def forward(*args, **kwargs):
                b = self.half_batch
                if b is None:
                    return self.visitor.visit(key, [lambda: original(*args, **kwargs)])[0]
                runs = [lambda h=h: original(*_split(args, h, b), **_split(kwargs, h, b)) for h in (0, 1)]
                plus, minus = self.visitor.visit(key, runs)
                return _join(plus, minus, b, where)
            return forward
        return make

    def remove(self) -> None:
        """Give the modules their own ``forward`` back."""
        self.overrides.remove()
