"""What SinkGD and SWAN share as stateless matrix optimizers (:mod:`lowmem.optim.stateless`), checked
for both: the routing by ``target_modules`` with no ``optimizer.state`` for the target weights, a
bit-exact resume, zero gradients and zero rows, and bad group keys named in one line. Each method's
own maths and its dense fp64 reference stay in test_sinkgd.py and test_swan.py."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from _stateless_helpers import check_resume_stateless, check_routing_and_no_state, rand
from lowmem.optim.sinkgd import SinkGD, sinkhorn_direction
from lowmem.optim.swan import SWAN, swan_direction


class Method(NamedTuple):
    cls: type
    direction: object      # the direction function on one gradient
    bad_marker: int        # a value the marker key (``cls.MARKER``) refuses
    keys: dict             # the target group's keys for the resume check


METHODS = {
    "sinkgd": Method(SinkGD, sinkhorn_direction, 0, dict(sinkhorn_iters=5, lr_scale=0.05, norm_eps=1e-8)),
    "swan": Method(SWAN, swan_direction, -1, dict(ns_steps=10, lr_scale=0.05, orient=True, center=True,
                                                  norm_eps=1e-8)),
}
pytestmark = pytest.mark.parametrize("name", list(METHODS))


def test_routing_and_empty_state(tiny_model, tiny_batch, name):
    check_routing_and_no_state(tiny_model, tiny_batch, name, METHODS[name].cls.MARKER)


def test_resume_is_bit_exact(name):
    check_resume_stateless(METHODS[name].cls, **METHODS[name].keys)


def test_zero_gradient_and_zero_row(name):
    direction = METHODS[name].direction
    assert torch.equal(direction(torch.zeros(6, 10)), torch.zeros(6, 10))
    g = rand(6, 10, seed=5)
    g[2] = 0.0
    d = direction(g)
    assert torch.isfinite(d).all() and torch.equal(d[2], torch.zeros(10, dtype=torch.float64))


def test_bad_group_keys_are_named(name):
    cls, marker = METHODS[name].cls, METHODS[name].cls.MARKER
    w = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=f"optim.args.{marker}"):
        cls([{"params": [w], marker: METHODS[name].bad_marker}])
    with pytest.raises(ValueError, match="optim.args.lr_scale"):
        cls([{"params": [w], marker: 3, "lr_scale": -0.1}])
    with pytest.raises(ValueError, match="optim.target_modules"):
        cls([{"params": [torch.nn.Parameter(torch.randn(4))], marker: 3}])
