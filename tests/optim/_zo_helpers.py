"""Shared pieces of the zeroth-order tests: a quadratic model and a peak-live-tensor meter."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Quadratic(nn.Module):
    """L(theta) = 1/2 (x - c)^T A (x - c) over x = concat(w.flatten(), b); grad = A (x - c)."""

    def __init__(self, shape=(3, 4), bias=5, dtype=torch.float64, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        self.b = nn.Parameter(torch.randn(bias, generator=gen, dtype=dtype))
        d = self.w.numel() + bias
        q = torch.randn(d, d, generator=gen, dtype=dtype)
        self.register_buffer("A", q @ q.T / d + torch.eye(d, dtype=dtype))
        self.register_buffer("c", torch.randn(d, generator=gen, dtype=dtype))

    def x(self) -> torch.Tensor:
        return torch.cat([self.w.flatten(), self.b])

    def forward(self) -> torch.Tensor:
        r = self.x() - self.c
        return 0.5 * r @ self.A @ r

    def grad(self) -> torch.Tensor:
        with torch.no_grad():
            return self.A @ (self.x() - self.c)


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensors allocated (and still alive) inside the ``with`` block.

    Every aten op's outputs whose storage is not one of its inputs' is a new
    allocation; a ``weakref.finalize`` subtracts it when the tensor dies.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._live_ptrs: set[int] = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._live_ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if ptr in inputs or ptr in self._live_ptrs or nbytes == 0:
                continue
            self._live_ptrs.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr, nbytes)
        return out


def lm_closure(model, batch):
    def closure():
        return model(**batch).loss
    return closure


def regenerate(tensor: torch.Tensor, step_seed: int, stream: int, index: int) -> torch.Tensor:
    from lowmem.optim.zo_noise import gaussian_like, param_seed
    return gaussian_like(tensor, param_seed(step_seed, stream, index))
