"""Seeded perturbations shared by every zeroth-order method (MeZO, ZO-AdaMU, ZO2, distributed ZO).

MeZO (Malladi et al., 2023) regenerates the perturbation ``z ~ N(0, I)`` from a
seed instead of storing it. The reference reseeds the *global* RNG and walks the
parameters in order, so ``z`` depends on iteration order and on every other
consumer of the global RNG. Here each parameter gets its own seed::

    seed(p) = mix(step_seed, stream, index(p))

and ``z`` is drawn from a private ``torch.Generator`` seeded with it. Hence

* ``z`` for a parameter is identical whichever order parameters are visited in,
  so the ZO2 engine (block by block, on another device copy) draws the very
  same ``z`` as in-memory MeZO -- bit for bit on the same device type;
* the global RNG (dropout, data sampling) is never touched;
* distributed ZO regenerates any rank's perturbation from ``(step_seed, stream)``
  with ``stream = rank * samples_per_rank + sample``.

``z`` is drawn in the dtype and on the device of the tensor it perturbs (as the
reference does), so no parameter-sized fp32 temporary is made for bf16 weights.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (order-sensitive, well mixed)."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def param_seed(step_seed: int, stream: int, index: int) -> int:
    return mix_seed(step_seed, stream, index)


def gaussian_like(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """``z ~ N(0, 1)`` shaped like ``tensor``, reproducible from ``seed`` on its device type."""
    gen = torch.Generator(device=tensor.device).manual_seed(seed)
    return torch.randn(tensor.shape, generator=gen, device=tensor.device, dtype=tensor.dtype)


@torch.no_grad()
def perturb_(tensor: torch.Tensor, seed: int, scale: float) -> None:
    """In place: ``tensor += scale * z(seed)`` with one tensor-sized temporary."""
    tensor.add_(gaussian_like(tensor, seed), alpha=scale)


@torch.no_grad()
def sgd_update_(tensor: torch.Tensor, seed: int, lr: float, projected_grad: float, weight_decay: float,
                restore: float = 0.0) -> None:
    """MeZO's update for one tensor, in place: ``tensor -= lr * (g * z(seed) + wd * tensor)``.

    With ``restore`` (the ``+eps`` that ends a two-point estimate) it first adds
    ``restore * z`` with the same draw -- the same operations as :func:`perturb_`
    then this update, one noise generation fewer. The single place this rule is
    written: in-memory MeZO and the ZO2 offload engine both call it, so the two
    stay bit-identical.
    """
    z = gaussian_like(tensor, seed)
    if restore:
        tensor.add_(z, alpha=restore)
    step = z.mul_(projected_grad)
    if weight_decay:
        step.add_(tensor, alpha=weight_decay)
    tensor.sub_(step.mul_(lr))
