"""ZO-AdaMU: momentum and uncertainty in the simulated perturbation (Jiang et al., AAAI 2024,
"ZO-AdaMU Optimizer: Adapting Perturbation by the Momentum and Uncertainty in Zeroth-order
Optimization", Algorithm 1).

Per step ``k = 0, 1, ...`` with ``(alpha, b1, b2) = Anneal(k)`` and per parameter a
momentum ``m`` (zero at the start)::

    zdot ~ N(0, alpha),  zdd ~ N(m_{k-1}, 1 - alpha)          # variances, as the reference's std=sqrt(.)
    z    = b1 zdot + (1 - b1) zdd                             # the perturbation
    g    = (L(theta + eps z) - L(theta - eps z)) / (2 eps)     # two forwards, in-place perturbation
    m_k  = b1 zdot + (1 - b1) zdd ;  v_k = b2 zdot^2 + (1 - b2) zdd^2
    theta <- theta - lr (g m_k / sqrt(v_k + 1e-8) + wd theta)   # wd per param group

Choices where the paper (arXiv 2312.15184, Algorithm 1 and Eq. 7) and the released code
(MathIsAll/ZO-AdaMU @ d5f7de2, ``trainer.py`` and ``mezo.sh``) disagree or are broken:

* Anneal: ``1`` for ``k < T1``; then ``0.5 (1 + cos(pi s / L(s)))`` with
  ``s = min(k, T2) - T1`` and ``L(s) = T3 - phi s (T3 - T2) / (T2 - T1)``, one ``phi`` per
  quantity, ``phi = (1.0, 0.1, 1.5)`` for ``(alpha, b1, b2)``. This is the code's
  ``_ema_weight`` evaluated *once per step* (the code shrinks ``L`` on each of its three
  calls per parameter, which collapses phase 2 and breaks), continuous at ``T1`` and
  constant from ``T2``. ``T3`` = the run's total steps, ``T2 = 0.8 T3`` (``mezo.sh``),
  ``T1 = min(1024, 0.05 T3)`` (Table 3's 1024 for the script's 20k steps). The paper's
  Eq. 7 does not survive extraction and its text states other final values
  (0.5, 0.9, 0.01); with this form (T1=1024, T2=16000, T3=20000) they are about
  (0.010, 0.13, 0.012): ``b2`` agrees, and ``b1 = 0.13`` on the *new* draw is the text's
  0.9 in Adam's convention (weight on the history) give or take.
* The perturbation and the update use the same ``b1`` and the same draws (the code mixes
  a fixed ``0.9 zdd + 0.1 zdot`` into the perturbation), and ``m`` is stored as ``m``,
  not ``sign(g) m``: Algorithm 1.
* The randomness is regenerated from seeds (:mod:`lowmem.optim.zo_noise`), see "Draws".

Draws. ``zdot = sqrt(alpha) u`` and ``zdd = m_{k-1} + sqrt(1 - alpha) u'`` need two independent
unit normals ``u, u'`` per element, but the perturbation only sees their mix
``a u + c u'`` (``a = b1 sqrt(alpha)``, ``c = (1 - b1) sqrt(1 - alpha)``). So each parameter
draws ``w`` (seed ``param_seed(s, 0, index)``) and ``r`` (seed ``mix_seed(s, 0, index, 1)``),
both N(0, 1), and sets, with ``sigma = sqrt(a^2 + c^2)``::

    u = (a w + c r) / sigma,   u' = (c w - a r) / sigma      # a rotation: u, u' iid N(0, 1)
    z = b1 zdot + (1 - b1) zdd = sigma w + (1 - b1) m_{k-1}

The pair ``(u, u')`` has exactly Algorithm 1's distribution, and a perturbation pass draws
``w`` alone: 4 noise draws per parameter and step (1 + 1 + 2 in the update) instead of 6,
against MeZO's 3. In phase 1 (``b1 = alpha = 1``) ``z = w``, MeZO's own draw, so phase 1
perturbs exactly like MeZO. ``noise`` (recipe ``optim.args.noise``) picks the kind of
``w`` and ``r``: ``gaussian`` (default), ``rademacher``, ``table`` or ``philox`` (counter-based
normals; on CUDA the perturbation passes are in-place Triton kernels).

Memory. The reference keeps ``m`` for every parameter from step 0, in the parameter
dtype. Here, while ``b1 = 1`` (phase 1) ``m_k = zdot_k`` is regenerated from the previous
step seed, so no buffer exists (memory = inference); from ``T1`` on, ``m`` is one buffer
per parameter in ``momentum_dtype``: default the parameter's; ``"bfloat16"`` halves fp32;
``"int8"`` keeps it 8-bit blockwise-quantized (signed dynamic map, one fp32 absmax per 256
values: about a quarter of fp32; :class:`~lowmem.optim.state_store.MomentStore`, tensors under
4096 values stay fp32). The perturbation and the update read the same stored ``m``, so
rounding it changes the walk, not the estimator's consistency. Temporaries: three tensors the
size of the parameter being updated (and the noise scratch buffer).
One process, or several holding one FSDP2-sharded model (:mod:`lowmem.optim.zo_shard`); ``mezo``
does distributed ZO over replicas.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from lowmem.dtypes import DTYPES, DtypeName
from lowmem.optim.args import Count, NonNegative, NonNegativeInt, Positive, typed
from lowmem.optim.registry import OptimizerSpec, register
from lowmem.optim.state_store import MomentStore
from lowmem.optim.zo_base import NoiseKind, ZerothOrderOptimizer
from lowmem.optim.zo_distributed import world
from lowmem.optim.zo_noise import Noise, mix_seed, param_seed
from lowmem.optim.zo_shard import local_shard

MomentumDtype = Literal[(*get_args(DtypeName), "int8")]  # int8: blockwise-quantized through MomentStore
_V_EPS = 1e-8  # Algorithm 1's constant under the square root


def anneal(k: int, t1: int, t2: int, t3: int, phi: float) -> float:
    """One of ``(alpha, b1, b2)`` at step ``k`` (0-based): 1, then cosine, then constant."""
    if k < t1:
        return 1.0
    s = min(k, t2) - t1
    length = t3 - phi * s * (t3 - t2) / (t2 - t1)
    return 0.5 * (1.0 + math.cos(math.pi * s / length))


class ZOAdaMU(ZerothOrderOptimizer):
    """``loss = opt.step(closure)`` (returns L+). ``total_steps`` is T3; ``t1``, ``t2`` default as above."""

    @typed
    def __init__(self, params, lr: NonNegative = 1e-4, eps: Positive = 1e-3, weight_decay: NonNegative = 0.0,
                 total_steps: Count = 20000, t1: NonNegativeInt | None = None, t2: Count | None = None,
                 phi: tuple[float, float, float] = (1.0, 0.1, 1.5), momentum_dtype: MomentumDtype | None = None,
                 seed: NonNegativeInt = 0, fp32_forward: bool = True, noise: NoiseKind = "gaussian"):
        t1 = min(1024, round(0.05 * total_steps)) if t1 is None else t1
        t2 = int(0.8 * total_steps) if t2 is None else t2
        if not t1 < t2 <= total_steps:
            raise ValueError(f"optim.args.t1: need 0 <= t1 < t2 <= total_steps, got {t1}, {t2}, {total_steps}")
        if any(not 0 <= f * (total_steps - t2) < total_steps for f in phi):
            raise ValueError(f"optim.args.phi: three values with 0 <= phi*(T3-T2) < T3, got {phi!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), eps=eps, seed=seed,
                         fp32_forward=fp32_forward)
        self.noise = Noise(noise)  # the unit draws behind zdot and zdd (lowmem.optim.zo_noise)
        self.t1, self.t2, self.t3, self.phi = t1, t2, total_steps, tuple(float(f) for f in phi)
        self.momentum_dtype = DTYPES.get(momentum_dtype)  # None: the parameter's (or int8)
        self._store = MomentStore(bits=8) if momentum_dtype == "int8" else None
        self._prev_seed, self._prev_alpha = -1, 1.0  # m_{k-1} = sqrt(alpha) zdot(prev seed) when no buffer

    def schedule(self, k: int) -> tuple[float, float, float]:
        """``(alpha, b1, b2)`` at step ``k``."""
        return tuple(anneal(k, self.t1, self.t2, self.t3, f) for f in self.phi)

    def _has_m(self, p: torch.Tensor) -> bool:
        state = self.param_state(p)
        return "m" in state or "m_codes" in state

    def _previous_m(self, p: torch.Tensor, index: int) -> torch.Tensor | None:
        """``m_{k-1}``: the stored buffer itself when it has ``p``'s dtype, else a fresh tensor (dequantized,
        cast or regenerated); either way the caller may overwrite it with ``m_k``."""
        state = self.param_state(p)
        if self._store is not None and "m_codes" in state:  # dequantized chunk by chunk
            m = torch.empty_like(p)
            for chunk in self._store.chunks(p.numel()):
                m.view(-1)[chunk[0]] = self._store.load(state, "m", p.shape, signed=True, chunk=chunk)
            return m
        if "m" in state:
            return state["m"].to(p.dtype)
        if self._prev_seed < 0:
            return None  # m_0 = 0
        return self.noise.draw(p, param_seed(self._prev_seed, 0, index)).mul_(math.sqrt(self._prev_alpha))

    @staticmethod
    def _mix(alpha: float, b1: float) -> tuple[float, float, float]:
        """``(sigma, cos, sin)``: ``b1 zdot + (1 - b1)(zdd - m) = sigma w`` with ``w ~ N(0, 1)``, and the
        rotation that recovers the unit draws ``u = cos w + sin r``, ``u' = sin w - cos r`` from ``w`` and
        a second draw ``r`` (module docstring, "Draws")."""
        a, c = b1 * math.sqrt(alpha), (1.0 - b1) * math.sqrt(1.0 - alpha)
        sigma = math.hypot(a, c)
        return (sigma, a / sigma, c / sigma) if sigma > 0 else (0.0, 1.0, 0.0)

    def _perturb(self, step_seed: int, stream: int, scale: float) -> None:
        """``theta += scale eps z`` with ``z = sigma w + (1 - b1) m_{k-1}``: one noise draw per parameter
        (two in-place adds; only the first while ``b1 = 1``), no parameter-sized temporary."""
        alpha, b1, _ = self.schedule(self._steps)
        sigma = self._mix(alpha, b1)[0]
        c = scale * self.eps
        for index, p, _ in self.indexed_params():
            self.noise.add_(p, param_seed(step_seed, 0, index), c * sigma)
            m_prev = self._previous_m(p, index) if b1 != 1.0 else None
            if m_prev is not None:
                p.add_(m_prev, alpha=c * (1.0 - b1))

    def _update(self, step_seed: int, g: float) -> None:
        """Algorithm 1's update; first ``theta += eps * z`` (the restore the two-point estimate left
        pending, with ``z = m`` from the same draws), one noise pass fewer than a separate restore."""
        coeffs = self.schedule(self._steps)
        for index, p, group in self.indexed_params():
            m, v = self._moments(p, index, step_seed, coeffs)
            p.add_(m, alpha=self.eps)  # m is the perturbation z of _perturb
            self._keep_m(p, m, phase_1=coeffs[1] == 1.0)
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.addcdiv_(m, v.add_(_V_EPS).sqrt_(), value=-group["lr"] * g)
        self._prev_seed, self._prev_alpha = (step_seed, coeffs[0]) if coeffs[1] == 1.0 else (-1, 1.0)

    def _moments(self, p: torch.Tensor, index: int, step_seed: int, coeffs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_k, v_k)`` of one parameter from the step's draws ``w``, ``r`` and ``m_{k-1}``; ``m_k`` is
        written into the stored momentum when that buffer has the parameter's dtype. Temporaries: ``w``
        (then ``zdd`` in place), the noise scratch ``r`` and ``zdot`` (then ``v``)."""
        alpha, b1, b2 = coeffs
        sigma, cos, sin = self._mix(alpha, b1)
        w = self.noise.draw(p, param_seed(step_seed, 0, index))
        if b1 == 1.0:  # phase 1: z = m = zdot = sqrt(alpha) w, v = zdot^2
            m = w.mul_(sigma)
            return m, m.square()
        r = self.noise.view(p, mix_seed(step_seed, 0, index, 1))
        m_prev = self._previous_m(p, index)
        root_a, root_1a = math.sqrt(alpha), math.sqrt(1.0 - alpha)
        zdot = torch.mul(w, root_a * cos).add_(r, alpha=root_a * sin)           # sqrt(alpha) u
        zdd = w.mul_(root_1a * sin).add_(r, alpha=-root_1a * cos)               # sqrt(1 - alpha) u', in w
        if m_prev is not None:
            zdd.add_(m_prev)
        m = m_prev if m_prev is not None else torch.empty_like(p)  # m_{k-1} is read: m_k goes in its place
        torch.lerp(zdd, zdot, b1, out=m)                           # b1 zdot + (1 - b1) zdd
        v = zdot.square_().mul_(b2).addcmul_(zdd, zdd, value=1.0 - b2)
        return m, v

    def _keep_m(self, p: torch.Tensor, m: torch.Tensor, phase_1: bool) -> None:
        """Store ``m_k`` for the next step (none in phase 1: m_k = sqrt(alpha) zdot_k is regenerated)."""
        state = self.param_state(p)
        if phase_1:
            for key in ("m", "m_codes", "m_absmax"):
                state.pop(key, None)
        elif self._store is not None:
            if not self._has_m(p):
                self._store.init(state, "m", p)
            for chunk in self._store.chunks(p.numel()):  # quantized chunk by chunk: one chunk's temporaries
                self._store.store(state, "m", m.reshape(-1)[chunk[0]].float(), signed=True, chunk=chunk)
        elif "m" in state:
            if state["m"] is not m:  # not already written in place by _moments
                state["m"].copy_(m)
        else:
            state["m"] = m.to(self.momentum_dtype or p.dtype, copy=True)

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor:
        self._require_closure(closure)
        if world()[1] > 1 and not self.sharded:
            raise ValueError("optim.name: zo_adamu runs on one process; use mezo for distributed ZO")
        # Algorithm 1: seed, Perturb(+1) L+, Perturb(-2) L-, Perturb(+1), g
        step_seed = self.draw_step_seed()
        loss_plus, g = self._two_point(closure, step_seed, 0, restore=False)
        # Algorithm 1: Perturb(+1) joined with the redraw of (zdot, zdd), m, v and the update
        if math.isfinite(g):
            self._update(step_seed, g)
        else:  # NaN/Inf: restore only
            self._perturb(step_seed, 0, +1.0)
        self.finish_step([g])
        return loss_plus

    def _extra_state(self) -> dict:
        return {"prev_seed": self._prev_seed, "prev_alpha": self._prev_alpha}

    def _load_extra_state(self, zo: dict) -> None:
        self._prev_seed, self._prev_alpha = int(zo["prev_seed"]), float(zo["prev_alpha"])
        for p, state in self.state.items():  # an 8-bit m read as absent (or the reverse) would restart it
            numel = local_shard(p).numel()  # a sharded parameter's state is laid out on its shard
            quantized, expected = "m_codes" in state, self._store is not None and self._store.quantized(numel)
            if ("m" in state or quantized) and quantized != expected:
                raise ValueError("optim.args.momentum_dtype: the checkpoint's ZO-AdaMU momentum was saved with "
                                 "another momentum_dtype (int8 or not); resume with the one it was saved with")


register(OptimizerSpec(name="zo_adamu", cls=ZOAdaMU, zeroth_order=True))
