"""Perturbing the parameters that stay on the device (embeddings, final norm, ``lm_head``).

During one dual forward (:mod:`lowmem.offload.hooks`) each resident unit runs its
branch-+ half and then its branch-- half. A parameter must go through exactly
MeZO's in-place sequence ``p += eps z; p += -2 eps z; p += eps z`` once per step
(Malladi et al., 2023, arXiv 2305.17333, Alg. 1) to stay bit-identical with in-memory MeZO, and z is drawn once
per parameter, so a tied embedding/``lm_head`` weight is perturbed once per step
as in MeZO -- not once per module as in the ZO2 reference code (liangyuwang/zo2,
arXiv 2503.12668), which perturbs a tied weight twice.

A parameter used by one unit is perturbed, used, and restored inside that unit's
visit. A parameter shared by several units (tied weights) is perturbed at its
first use and kept at ``theta - eps z`` until the forward ends; a copy of
``theta + eps z`` is swapped in for the branch-+ half of its later uses (one
extra copy of that weight on the device, for the duration of the forward).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lowmem.optim.zo_noise import GAUSSIAN, Noise, param_seed

Indexed = list[tuple[torch.Tensor, int]]  # (parameter, its index in the optimizer's flat list)


def perturbed_pair(params: Indexed, runs: list[Callable[[], Any]], step_seed: int, eps: float,
                   noise: Noise = GAUSSIAN) -> list[Any]:
    """MeZO's perturb / forward / perturb / forward / restore on ``params`` around ``runs[0]``, ``runs[1]``."""
    seeds = [param_seed(step_seed, 0, idx) for _, idx in params]
    for (p, _), s in zip(params, seeds):
        noise.add_(p, s, 1.0 * eps)
    plus = runs[0]()
    for (p, _), s in zip(params, seeds):
        noise.add_(p, s, -2.0 * eps)
    minus = runs[1]()
    for (p, _), s in zip(params, seeds):
        noise.add_(p, s, 1.0 * eps)
    return [plus, minus]


class ResidentPerturber:
    """Per-forward bookkeeping of the resident units' perturbations."""

    def __init__(self, unit_params: list[Indexed], noise: Noise = GAUSSIAN):
        self.unit_params, self.noise = unit_params, noise
        owners: dict[int, int] = {}
        for params in unit_params:
            for p, _ in params:
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.shared = {pid for pid, n in owners.items() if n > 1}
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # id -> (param, theta+eps z, index)
        self._done: set[int] = set()

    def visit(self, k: int, runs: list[Callable[[], Any]], step_seed: int, eps: float) -> list[Any]:
        params = self.unit_params[k]
        fresh = [(p, idx) for p, idx in params if id(p) not in self._held]
        again = [pid for pid in (id(p) for p, _ in fresh) if pid in self._done]
        if again:
            raise RuntimeError("offload: a resident module ran twice in one forward with untied weights; "
                               "ZO2 cannot give it the same perturbation twice")
        held = [self._held[id(p)] for p, _ in params if id(p) in self._held]
        seeds = [param_seed(step_seed, 0, idx) for _, idx in fresh]
        for (p, idx), s in zip(fresh, seeds):
            self.noise.add_(p, s, 1.0 * eps)
            if id(p) in self.shared:
                self._held[id(p)] = (p, p.detach().clone(), idx)
        minus_data = [p.data for p, _, _ in held]
        for p, plus_copy, _ in held:
            p.data = plus_copy
        plus = runs[0]()
        for (p, _, _), data in zip(held, minus_data):
            p.data = data
        for (p, _), s in zip(fresh, seeds):
            self.noise.add_(p, s, -2.0 * eps)
        minus = runs[1]()
        for (p, idx), s in zip(fresh, seeds):
            if id(p) not in self.shared:
                self.noise.add_(p, s, 1.0 * eps)
                self._done.add(id(p))
        return [plus, minus]

    def end_forward(self, step_seed: int, eps: float) -> None:
        """Restore the shared parameters (``theta - eps z`` + ``eps z``) and forget the forward."""
        for p, _, idx in self._held.values():
            self.noise.add_(p, param_seed(step_seed, 0, idx), 1.0 * eps)
        self._held.clear()
        self._done.clear()
