"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., 2023, "Fine-Tuning Language
Models with Just Forward Passes", Algorithm 1), with n-SPSA, momentum and distributed
shared-seed updates.

Per step, with step seed ``s`` (private generator) and samples ``i = 1..n``
(``z_i`` regenerated per parameter from ``param_seed(s, stream_i, index)``)::

    g_i   = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)    # in-place perturb, 2 forwards
    d     = 1/n sum_i g_i z_i + wd * theta                         # wd only where the group says
    theta <- theta - lr * d                                        # momentum = 0 (reference MeZO)
    buf   <- mu * buf + d ;  theta <- theta - lr * buf              # momentum mu > 0 (= torch SGD)

* ``z``: ``noise`` picks N(0, I) (default), Rademacher +-1, slices of a shared
  noise table (:mod:`lowmem.optim.zo_noise`; the table is the fast one on CPU) or
  ``philox``: N(0, I) from a counter-based generator, added in place by one Triton
  kernel per parameter on CUDA, with no ``z`` buffer (issue #17).
* ``n = 1``, ``mu = 0``: each parameter is updated by
  :func:`lowmem.optim.zo_noise.sgd_update_`, the rule the ZO2 engine shares.
* noise passes: the reference draws ``z`` four times per step (+eps, -2 eps,
  +eps, update). With one stream in all, the restoring ``+eps z`` is applied in
  the update's pass with the same draw -- the same arithmetic, three passes.
* n-SPSA: the medium-model MeZO trainer's ``g z / n`` average; streams ``0..n-1``.
* weight decay: per param group. ``create_optimizer`` gives biases and norms
  ``weight_decay = 0``, as the reference exempts ``bias``/``layer_norm`` names.
* distributed (torch.distributed initialised, N > 1 processes): every process
  evaluates streams ``rank*n .. rank*n+n-1`` on its own batch, the scalars are
  all-gathered (:mod:`lowmem.optim.zo_distributed`) and all ``N n`` updates are
  applied everywhere. Each process also repeats the other processes' perturb/restore
  cycles (``+eps z, -2 eps z, +eps z``, no forward): those do not give back theta
  exactly in floating point, so this is what keeps the replicas *bit*-identical
  (the reference instead restores a snapshot every 16 rounds). Cost: ``3 (N-1) n``
  extra noise passes per step, no extra forward. :meth:`MeZO.replay` makes a
  recorded step from ``(step seed, [g])`` alone. A process may leave between steps:
  the others go on in a smaller group (:meth:`MeZO.set_process_group`).

Memory equals inference: the forwards run under ``no_grad`` (nothing is kept for
backward, no ``.grad`` is made) and the only temporary is one ``z`` shaped like the
parameter being touched (momentum adds one buffer per parameter). Seeds, the
closure contract and low-precision forwards: :mod:`lowmem.optim.zo_base`.
The step's ``g`` values (as applied) are in ``last_projected_grads``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowmem.optim.args import Count, Fraction, NonNegative, NonNegativeInt, Positive, typed
from lowmem.optim.registry import OptimizerSpec, register
from lowmem.optim.zo_base import NoiseKind, ZerothOrderOptimizer
from lowmem.optim.zo_distributed import GradExchange
from lowmem.optim.zo_noise import Noise, param_seed, sgd_update_


class MeZO(ZerothOrderOptimizer):
    """ZO-SGD with in-place seeded perturbations; ``loss = opt.step(closure)`` returns L+ (mean over samples)."""

    @typed
    def __init__(self, params, lr: NonNegative = 1e-6, eps: Positive = 1e-3, weight_decay: NonNegative = 0.0,
                 momentum: Fraction = 0.0, n_samples: Count = 1, seed: NonNegativeInt = 0, fp32_forward: bool = True,
                 one_byte: bool = False, levels_per_efold: Count = 8, process_group: Any = None,
                 noise: NoiseKind = "gaussian"):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults, eps=eps, seed=seed, fp32_forward=fp32_forward)
        self.n_samples = n_samples
        self.noise = Noise(noise)
        self.exchange = GradExchange(one_byte=one_byte, levels_per_efold=levels_per_efold, group=process_group)

    def _perturb(self, step_seed: int, stream: int, scale: float) -> None:
        for index, p, _ in self.indexed_params():
            self.noise.add_(p, param_seed(step_seed, stream, index), scale * self.eps)

    def shard(self) -> None:
        super().shard()
        self.exchange.one_replica = True

    def set_process_group(self, group) -> None:
        """Go on with the processes of ``group`` from the next step, e.g. after a process left.

        Streams are renumbered by rank in ``group`` and every member keeps applying
        every member's update, so the replicas stay bit-identical; a process outside
        ``group`` must stop stepping. Call it between steps, on every member.
        """
        self.exchange.group = group

    def local_streams(self) -> list[int]:
        rank, _ = self.exchange.rank_world()
        return [rank * self.n_samples + j for j in range(self.n_samples)]

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor:
        self._require_closure(closure)
        # 1. one step seed, shared by every process (same private generator)
        step_seed = self.draw_step_seed()
        _, size = self.exchange.rank_world()
        local = set(self.local_streams())
        # one stream in all: its restore (+eps z) joins the update pass, 3 noise passes instead of 4
        fused = size * self.n_samples == 1
        losses, local_g = [], []
        for stream in range(size * self.n_samples):
            if stream in local:  # 2. two-point estimate on this process's batch (MeZO Alg. 1, lines 3-7)
                loss_plus, g = self._two_point(closure, step_seed, stream, restore=not fused)
                losses.append(loss_plus)
                local_g.append(g)
            else:  # the other processes' perturb/restore, no forward: same rounding everywhere
                self._perturb_cycle(step_seed, stream)
        # 3. exchange the scalars (identity on one process; one-byte codec if asked)
        all_g = self.exchange(local_g)
        # 4. every process applies every update (MeZO Alg. 1, lines 8-11), unless a g is NaN/Inf
        if all(map(math.isfinite, all_g)):
            apply_updates(self, step_seed, list(enumerate(all_g)), restore=self.eps if fused else 0.0)
        elif fused:
            self._perturb(step_seed, 0, +1.0)
        self.finish_step(all_g)
        return torch.stack(losses).mean()

    def _perturb_cycle(self, step_seed: int, stream: int) -> None:
        for scale in (1.0, -2.0, 1.0):
            self._perturb(step_seed, stream, scale)

    @torch.no_grad()
    def replay(self, step_seed: int, projected_grads: list[float]) -> None:
        """Make one recorded step without forwards: what every replica did with ``(seed, [g])``."""
        for stream in range(len(projected_grads)):
            self._perturb_cycle(step_seed, stream)
        apply_updates(self, step_seed, list(enumerate(projected_grads)))
        self._steps += 1


@torch.no_grad()
def apply_updates(opt: MeZO, step_seed: int, samples: list[tuple[int, float]], restore: float = 0.0) -> None:
    """Apply ``(stream, g)`` pairs of one step: ``theta -= lr * (mean g z + wd theta)`` (or with momentum).

    ``restore``: with a single sample whose two-point estimate left theta at
    ``theta - eps z``, first add ``restore * z`` back with the same draw (the same
    operations as a separate restore pass). Public so that a process (or a test)
    can replay a recorded ``(seed, g)`` list.
    """
    n = len(samples)
    if restore and n != 1:
        raise ValueError("restore: only a single sample's restore can join its update")
    for index, p, group in opt.indexed_params():
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        seeds = [(param_seed(step_seed, stream, index), g) for stream, g in samples]
        if mu == 0:
            # weight decay once: lr/n * (n wd) = lr wd; with n = 1 exactly sgd_update_(p, s, lr, g, wd)
            for k, (seed, g) in enumerate(seeds):
                sgd_update_(p, seed, lr / n, g, wd * n if k == 0 else 0.0, restore=restore, noise=opt.noise)
            continue
        state = opt.param_state(p)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"].mul_(mu)
        for seed, g in seeds:
            z = opt.noise.add_view_(p, seed, restore) if restore else opt.noise.view(p, seed)
            buf.add_(z, alpha=g / n)
        if wd:
            buf.add_(p, alpha=wd)
        p.sub_(buf, alpha=lr)


register(OptimizerSpec(name="mezo", cls=MeZO, zeroth_order=True))
