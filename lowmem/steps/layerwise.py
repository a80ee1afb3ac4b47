"""Layer-wise updates: each parameter is stepped inside backward, as soon as its gradient is
complete, and the gradient is freed at once, so the full gradients of all layers never
coexist (GaLore, Zhao et al. 2024, §4.3 "per-layer weight updates"; Lv et al. 2023, LOMO).

``LayerwiseOptimizer(optimizer, grad_accum_steps=1, max_grad_norm=None)`` wraps an optimizer
built normally. It is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the
inner optimizer's own objects, so an LR scheduler built on the wrapper drives the LR the hooks
use. The training loop stays the normal one::

    loss.backward()          # hooks: update each param with its gradient, free the gradient
    optimizer.step()         # bookkeeping: flush params whose gradient was not consumed
    scheduler.step()         # once per optimizer step (the reference repos step it per param)
    optimizer.zero_grad()

Fixes of the reference's layer-wise mode (jiaweizzhao/GaLore ``torchrun_main.py``: a
scheduler per parameter and a step per micro-batch, GaLore issue #78 / PR #79 and
zhuhanqing/APOLLO issue #14; clipping after the hooks have consumed the gradients):

* LR schedule: one scheduler on the wrapper, stepped once per optimizer step.
* Gradient accumulation ``A > 1``: a parameter's hook lets its gradient accumulate in ``.grad``
  and updates only on the A-th gradient since the last ``step()``; ``step()`` updates any
  parameter left with a partial gradient. The result equals normal accumulation, but gradients
  are held across micro-batches, so the memory saving then shrinks to the last micro-batch.
* Gradient clipping is refused: the global norm is known only after every gradient exists,
  by which time layer-wise mode has already applied and freed most of them.
* Non-finite gradients: a parameter whose gradient holds NaN/Inf is not updated (its gradient is
  dropped) and :meth:`take_nonfinite` reports it, so the trainer counts a skipped step. Unlike
  normal mode the other parameters of that step were already updated: the guard keeps the
  weights finite, it cannot make the step all-or-nothing.

Given the ``model``, a tied input embedding returns its lookup gradient as rows
(:mod:`lowmem.steps.tied_lookup`, bit-identical sums): the embedding/LM-head weight's dense
gradient then exists once at the end of backward instead of three times (issue 15).
"""

from __future__ import annotations

import torch

from lowmem.optim.registry import is_zeroth_order
from lowmem.optim.step_one import all_finite, step_one
from lowmem.steps.base import WrappingOptimizer
from lowmem.steps.tied_lookup import install_row_gradients


def check_layerwise(where: str, *, zeroth_order: bool = False, max_grad_norm: float | None = None,
                    processes: int = 1, fp16: bool = False, clip_fix: str = "set it to null") -> None:
    """Refuse, in one line naming ``where`` (``optim.layerwise``, ``LowMemCallback(layerwise=True)``), what
    layer-wise updates cannot do: hook a zeroth-order optimizer (no backward), clip by the global
    norm (known only after most layers were updated and their gradients freed), run under data
    parallel (updates would precede the gradient all-reduce) or fp16 (the loss scaler unscales and
    checks gradients only after backward). The one statement of these rules, for the recipe
    (:func:`lowmem.build.build_optimizer`), the wrapper and the Hugging Face callback."""
    if zeroth_order:
        raise ValueError(f"{where}: zeroth-order optimizers have no backward pass to hook")
    if max_grad_norm:
        raise ValueError(f"{where}: gradient clipping (max_grad_norm) is not supported, the global gradient norm "
                         f"is known only after the layers were updated; {clip_fix}")
    if processes > 1:
        raise ValueError(f"{where}: not supported with data parallel (updates would run before the gradient "
                         "all-reduce)")
    if fp16:
        raise ValueError(f"{where}: not supported with fp16 mixed precision (loss scaling); use bf16")


class LayerwiseOptimizer(WrappingOptimizer):
    steps_in_backward = True  # what the first-order offload engine refuses to wrap (it is layer-wise itself)

    def __init__(self, optimizer: torch.optim.Optimizer, grad_accum_steps: int = 1,
                 max_grad_norm: float | None = None, model: torch.nn.Module | None = None):
        if isinstance(optimizer, LayerwiseOptimizer):
            raise ValueError("optim.layerwise: the optimizer is already layer-wise")
        check_layerwise("optim.layerwise", zeroth_order=is_zeroth_order(optimizer), max_grad_norm=max_grad_norm)
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"optim.layerwise: grad_accum_steps must be an integer >= 1, got {grad_accum_steps!r}")
        self.optimizer = optimizer
        self.grad_accum_steps = grad_accum_steps
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._share_inner()
        self._where: dict[int, int] = {}  # id(param) -> index of its group
        self._grads_seen: dict[int, int] = {}  # id(param) -> gradients accumulated since the last step()
        self._nonfinite = False
        self._handles = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._where[id(p)] = index
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._undo_lookup = None if model is None else install_row_gradients(model)

    def _share_inner(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad.is_sparse:  # a tied embedding's rows alone (its head took no part in this loss)
            p.grad = p.grad.to_dense()
        if not all_finite(p.grad):  # never step on NaN/Inf: drop this gradient
            self._nonfinite = True
            p.grad = None
        seen = self._grads_seen.get(id(p), 0) + 1
        self._grads_seen[id(p)] = seen
        if seen % self.grad_accum_steps == 0:
            self._step_param(p)

    def _step_param(self, p: torch.Tensor) -> None:
        step_one(self.optimizer, self._where[id(p)], p)

    @torch.no_grad()
    def step(self, closure=None):
        """Update parameters whose gradient was not consumed in backward (fewer than
        ``grad_accum_steps`` gradients, e.g. a parameter unused by some micro-batches)."""
        if closure is not None:
            raise ValueError("optim.layerwise: step(closure) is not supported; call loss.backward() first")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) in self._where:
                    self._step_param(p)
        self._grads_seen.clear()

    def take_nonfinite(self) -> bool:
        """Whether a NaN/Inf gradient was dropped since the last call (then cleared)."""
        found, self._nonfinite = self._nonfinite, False
        return found

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share_inner()

    def remove(self) -> None:
        """Remove the hooks: the wrapped optimizer can be used normally again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._undo_lookup is not None:
            self._undo_lookup()
            self._undo_lookup = None
