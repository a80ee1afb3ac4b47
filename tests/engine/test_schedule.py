"""``train.lr_schedule`` through transformers' schedulers equals the schedule's formula: warmup i/W, then
constant 1, linear 1 - (1 - r) p, or cosine r + (1 - r)(1 + cos(pi p))/2 with p = (i - W)/(T - W)."""

import math

import pytest
import torch

from lowmem.build import build_scheduler
from lowmem.recipe import TrainSection


def formula(kind: str, floor: float, i: int, warm: int = 2, total: int = 10) -> float:
    if i < warm:
        return i / warm
    p = (i - warm) / (total - warm)
    if kind == "constant" or floor == 1.0:
        return 1.0
    if kind == "linear":
        return 1 - (1 - floor) * p
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("floor", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_follows_its_formula(kind, floor):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    scheduler = build_scheduler(opt, TrainSection(steps=10, warmup_steps=2, lr_schedule=kind, min_lr_ratio=floor))
    for i in range(10):
        assert opt.param_groups[0]["lr"] / 0.5 == pytest.approx(formula(kind, floor, i), abs=1e-12), i
        opt.step()
        scheduler.step()
