"""Any ``loss_fn(model, batch)`` objective through ZO2's dual forward (e.g. MeZO's candidate
classification, :func:`lowmem.objectives.classification_loss`).

ZO2 (Wang et al., 2025, arXiv 2503.12668, §3.3) evaluates ``L(theta + eps z)`` and ``L(theta - eps z)`` in
*one* forward of the doubled batch ``[x; x]`` (:mod:`lowmem.offload.hooks`), but an
objective calls the model itself, once per loss. :class:`DualCall` stands in for the
model inside the objective::

    dual = DualCall(model, rows)
    loss_plus  = loss_fn(dual.branch(0), batch)   # runs model(**[x; x]) once, returns the + half
    loss_minus = loss_fn(dual.branch(1), batch)   # same call: returns the cached - half

The first call doubles every tensor argument with ``rows`` rows along dimension 0 and
runs the real model; each branch gets the rows of its half of every output tensor, in
the output's own class (``out.logits`` works as usual). The objective must compute its
loss from the outputs (a ``labels`` argument would make the model mix both halves in
one loss, so it is refused) and call the model once per loss with the same arguments.
"""

from __future__ import annotations

from typing import Any

import torch


def _double(value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
        return torch.cat([value, value])
    return value


class DualCall:
    """One dual forward of ``model`` shared by the two branches' calls (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, rows: int):
        self.model, self.rows = model, rows
        self._out = None
        self._calls = 0

    def branch(self, half: int):
        """A callable standing in for ``model`` in branch ``half`` (0: +eps, 1: -eps)."""

        def call(*args, **kwargs):
            if args or "labels" in kwargs:
                raise ValueError("data.task: with offload.enabled the objective must call the model with keyword "
                                 "inputs and no labels (it computes its loss from the logits)")
            self._calls += 1
            if self._calls > 2 or (half == 0) != (self._out is None):
                raise ValueError("data.task: with offload.enabled the objective must call the model once per loss")
            if self._out is None:
                self._out = self.model(**{k: _double(v, self.rows) for k, v in kwargs.items()})
            return self._half(half)

        return call

    def _half(self, half: int):
        out, n = self._out, self.rows
        fields = {k: v[half * n:(half + 1) * n] if isinstance(v, torch.Tensor) and v.dim() >= 1
                  and v.shape[0] == 2 * n else v for k, v in out.items()}
        return type(out)(**fields)
