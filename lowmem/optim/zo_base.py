"""What every in-memory zeroth-order optimizer shares: step seeds, the two-point estimate, state.

A zeroth-order (ZO) optimizer is a plain ``torch.optim.Optimizer`` with the class
attribute ``zeroth_order = True``. The trainer puts the model in eval mode and calls
``loss = optimizer.step(closure)``; ``closure()`` runs one forward on the current
batch and returns the scalar loss. ``step`` calls it twice per perturbation (SPSA,
Spall 1992; MeZO, Malladi et al. 2023, Algorithm 1)::

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)        # projected gradient

and returns ``L(theta + eps z)`` as a tensor.

Seeds (the contract with the ZO2 offload engine and with distributed ZO):

* one *step seed* per step, drawn from the optimizer's private ``torch.Generator``
  (seeded with ``seed``; its state is in ``state_dict()["zo"]``, so resume is exact)
  by :meth:`ZerothOrderOptimizer.draw_step_seed`, which also stores it in
  ``last_step_seed``;
* the noise of parameter number ``index`` -- its flat position in
  ``[p for g in param_groups for p in g["params"]]``, see :meth:`indexed_params` --
  for sample ``stream`` is ``gaussian_like(p, param_seed(step_seed, stream, index))``
  (:mod:`lowmem.optim.zo_noise`); ``stream = rank * n_samples + sample``.

Low precision (issue #9): under bf16 autocast the rounding noise of each forward is
of the order of the finite difference itself (SmolLM2-135M: RMS error 0.88 against a
signal of 1.9). With ``fp32_forward=True`` (default) the closure runs with autocast
*disabled*, so forwards use the fp32 weights. The closure must therefore not enter
autocast itself (for an ``accelerate``-prepared model: unwrap the autocast forward).
Models stored in bf16 get no help from this: use a larger ``eps`` (e.g. 1e-2).
"""

from __future__ import annotations

import contextlib
import math
from typing import Annotated, Callable, Iterator

import torch
from pydantic import AfterValidator

from lowmem.optim.zo_noise import Noise
from lowmem.optim.zo_shard import local_shard

_SEED_HIGH = 1 << 62
NoiseKind = Annotated[str, AfterValidator(lambda kind: Noise(kind).kind)]  # optim.args.noise, checked by Noise


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Base class: seeds, the closure evaluation and the two-point estimate. Subclasses
    define ``_perturb(step_seed, stream, scale)`` and ``step``."""

    zeroth_order = True

    def __init__(self, params, defaults: dict, eps: float, seed: int, fp32_forward: bool):
        """The subclasses' ``@typed`` constructors validate the arguments (:mod:`lowmem.optim.args`)."""
        super().__init__(params, defaults)
        self.eps, self.seed, self.fp32_forward = float(eps), seed, bool(fp32_forward)
        self._generator = torch.Generator().manual_seed(seed)
        self._steps = 0  # completed steps
        self.last_step_seed: int | None = None
        self.last_projected_grads: list[float] = []
        self.last_step_skipped = False
        self.sharded = False  # True once the model is sharded by FSDP2 (shard())

    def shard(self) -> None:
        """The model is sharded by FSDP2 (:mod:`lowmem.optim.zo_shard`): the processes hold one model
        between them, so they act as one replica, and each perturbs its shards with their slices of
        the one-process draws (drawn alone: :meth:`indexed_params` hands the noise shards that carry
        their place). Called once, after ``fully_shard``, by the FSDP2 step."""
        self.sharded = True

    # ---- seeds -------------------------------------------------------------------
    def draw_step_seed(self) -> int:
        """Advance the private generator by one step seed (also kept in ``last_step_seed``)."""
        self.last_step_seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=self._generator))
        return self.last_step_seed

    def indexed_params(self) -> Iterator[tuple[int, torch.Tensor, dict]]:
        """``(index, param, group)`` with ``index`` the flat position used in ``param_seed``; a
        parameter sharded by FSDP2 comes as this rank's shard (:func:`~lowmem.optim.zo_shard.local_shard`,
        its state under ``sharded_param``)."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, local_shard(p), group
                index += 1

    def param_state(self, p: torch.Tensor) -> dict:
        """The state of the parameter ``p`` of :meth:`indexed_params` stands for."""
        return self.state[getattr(p, "sharded_param", p)]

    def finish_step(self, projected_grads: list[float]) -> None:
        """Record a step's projected gradients; count it unless one was non-finite, in which
        case the caller applied no update (the NaN/Inf guard: the trainer logs a skipped step).
        The ZO2 engine calls this too, for the steps it runs outside ``step()``."""
        self.last_projected_grads = list(projected_grads)
        self.last_step_skipped = not all(map(math.isfinite, projected_grads))
        if not self.last_step_skipped:
            self._steps += 1

    # ---- forwards ----------------------------------------------------------------
    def _autocast_off(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.fp32_forward:
            for device_type in sorted({p.device.type for _, p, _ in self.indexed_params()}):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        return stack

    def _evaluate(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self._autocast_off():
            loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("closure: must return the scalar loss tensor")
        return loss.detach()

    def _two_point(self, closure, step_seed: int, stream: int, restore: bool = True) -> tuple[torch.Tensor, float]:
        """MeZO Algorithm 1 lines 3-7: L+ at theta+eps z, L- at theta-eps z, restore, g.

        ``restore=False`` leaves theta at ``theta - eps z``: the caller adds the
        ``+eps z`` back in the pass that applies the update (one noise pass fewer)."""
        self._perturb(step_seed, stream, +1.0)
        loss_plus = self._evaluate(closure)
        self._perturb(step_seed, stream, -2.0)
        loss_minus = self._evaluate(closure)
        if restore:
            self._perturb(step_seed, stream, +1.0)  # back to theta (within rounding)
        g = (float(loss_plus) - float(loss_minus)) / (2.0 * self.eps)  # in float64
        return loss_plus, g

    def _perturb(self, step_seed: int, stream: int, scale: float) -> None:
        raise NotImplementedError

    @staticmethod
    def _require_closure(closure) -> None:
        if closure is None:
            raise ValueError("closure: a zeroth-order step(closure) needs the closure that runs the forward")

    # ---- state -------------------------------------------------------------------
    def _extra_state(self) -> dict:
        """Plain numbers a subclass adds to ``state_dict()["zo"]``."""
        return {}

    def _load_extra_state(self, zo: dict) -> None:
        pass

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"] = {"generator_state": self._generator.get_state(), "steps": self._steps,
                    "last_step_seed": -1 if self.last_step_seed is None else self.last_step_seed,
                    **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("state_dict: missing the 'zo' entry (generator state) of a zeroth-order optimizer")
        from lowmem.optim.state_store import load_keeping_dtypes  # the 8-bit kernels load on first use

        load_keeping_dtypes(self, state_dict, super().load_state_dict)  # e.g. ZO-AdaMU's int8 momentum codes
        self._generator.set_state(torch.as_tensor(zo["generator_state"], dtype=torch.uint8).cpu())
        self._steps = int(zo["steps"])
        last = int(zo["last_step_seed"])
        self.last_step_seed = None if last < 0 else last
        self._load_extra_state(zo)
