"""Step time of the zeroth-order optimizers against a plain MeZO loop, side by side in one process.

The reference row is :class:`PlainMeZO`, the shortest fast MeZO (Malladi et al. 2023,
Algorithm 1) one would write by hand: one reusable ``z`` buffer, ``normal_`` from a
private generator reseeded per pass, the restore and the update fused into one add.
Every row is timed in each of ``repeats`` rounds (rows interleaved, so a slow phase of
a shared machine hits all of them), as the median of ``steps`` steps after a warm-up
step, and divided by the median of 3 no-grad forwards timed right before that row's steps (so a
slow phase of a shared machine hits a row's step and its forward alike).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch

from lowmem.optim.mezo import MeZO
from lowmem.optim.zo_adamu import ZOAdaMU


class PlainMeZO:
    """The reference loop (lr, eps as MeZO); ``step(closure)`` returns L+."""

    def __init__(self, params, lr: float, eps: float = 1e-3, seed: int = 0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.eps = lr, eps
        self.seeds = torch.Generator().manual_seed(seed)
        self.buf = torch.empty(max(p.numel() for p in self.params))

    def _walk(self, seed: int, alpha: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in self.params:
            p.add_(self.buf[:p.numel()].view_as(p).normal_(generator=gen), alpha=alpha)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.seeds))
        self._walk(seed, self.eps)
        loss_plus = closure()
        self._walk(seed, -2 * self.eps)
        loss_minus = closure()
        g = (float(loss_plus) - float(loss_minus)) / (2 * self.eps)
        self._walk(seed, self.eps - self.lr * g)  # restore and update in one pass
        return loss_plus


ROWS = {  # name -> optimizer factory over the model's parameters (lr 0: the weights stay put)
    "plain MeZO loop (reference)": lambda ps: PlainMeZO(ps, lr=0.0),
    "mezo": lambda ps: MeZO(ps, lr=0.0),
    "mezo noise=rademacher": lambda ps: MeZO(ps, lr=0.0, noise="rademacher"),
    "mezo noise=table": lambda ps: MeZO(ps, lr=0.0, noise="table"),
    # on CPU: the chunked PyTorch reference of the Philox kernel (int64 tensor ops), slow by design
    "mezo noise=philox": lambda ps: MeZO(ps, lr=0.0, noise="philox"),
    "zo_adamu": lambda ps: ZOAdaMU(ps, lr=0.0, total_steps=8, t1=0, t2=4),
    "zo_adamu noise=table": lambda ps: ZOAdaMU(ps, lr=0.0, total_steps=8, t1=0, t2=4, noise="table"),
}
_MEZO_OF = {"zo_adamu": "mezo", "zo_adamu noise=table": "mezo noise=table"}


def _median_time(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(model, loss: Callable[[], torch.Tensor], repeats: int = 3, steps: int = 3) -> list[list]:
    """Rows ``[name, forward s, step s, step / forward (median, min-max over rounds), vs MeZO]``."""
    params = list(model.parameters())
    snapshot = [p.detach().clone() for p in params]
    ratios: dict[str, list[float]] = {name: [] for name in ROWS}
    seconds: dict[str, list[float]] = {name: [] for name in ROWS}
    forwards = []
    with torch.no_grad():
        loss()  # warm-up
    for _ in range(repeats):
        for name, make in ROWS.items():
            opt = make(params)
            opt.step(loss)  # warm-up (ZO-AdaMU: allocates its momentum, phase 2 from here)
            with torch.no_grad():  # the forward right before the row's steps: both see the same machine
                forward = _median_time(loss, 3)
            forwards.append(forward)
            step = _median_time(lambda: opt.step(loss), steps)
            seconds[name].append(step)
            ratios[name].append(step / forward)
            print(f"{name}: forward {forward:.3f} s, step {step:.3f} s, {step / forward:.2f}x", file=sys.stderr, flush=True)
            del opt
            with torch.no_grad():
                for p, p0 in zip(params, snapshot):
                    p.copy_(p0)
    rows = []
    for name in ROWS:
        r = ratios[name]
        versus = "-"
        if name in _MEZO_OF:  # same rounds, same noise kind
            rel = [a / b for a, b in zip(seconds[name], seconds[_MEZO_OF[name]])]
            versus = f"{statistics.median(rel):.2f}x"
        rows.append([name, f"{statistics.median(forwards):.3f}", f"{statistics.median(seconds[name]):.3f}",
                     f"{statistics.median(r):.2f}", f"{min(r):.2f}-{max(r):.2f}", versus])
    return rows


HEADER = ["optimizer", "forward s", "ZO step s", "step / forward (median)", "min-max over rounds",
          "ZO-AdaMU / MeZO step"]
