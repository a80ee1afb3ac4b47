"""FRUGAL: gradient splitting identities, limits rho=1 (AdamW) and rho=0 (signSGD), resets, blocks, resume."""

import pytest
import torch

from _compress_helpers import check_resume, groups_for, make_params, run, set_grads
from lowmem.optim.frugal import FRUGAL

KINDS = ["svd", "random", "columns", "rows", "randk"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_up_down_plus_residual_is_the_gradient(kind, shape):
    w = torch.nn.Parameter(torch.randn(shape))
    opt = FRUGAL([{"params": [w], "density": 0.3, "proj_type": kind}])
    g = torch.randn(shape)
    state = opt.state[w]
    state["step"] = 0
    opt._switch(w, opt.param_groups[0], state, g)
    low, up, residual = opt._split(w, opt.param_groups[0], state, g)
    assert 0 < low.numel() < g.numel()
    if kind in ("svd", "random"):
        torch.testing.assert_close(up(low) + residual, g, atol=1e-5, rtol=0)
    else:
        assert torch.equal(up(low) + residual, g)  # coordinates: exact
        assert torch.count_nonzero(up(low) * residual) == 0  # disjoint supports


@pytest.mark.parametrize("kind", ["columns", "rows", "randk", "block"])
def test_density_one_equals_torch_adamw(kind):
    params, ref_params = make_params(), make_params()
    opt = FRUGAL(groups_for(params, density=1.0, proj_type=kind, update_proj_gap=1000), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, eps=1e-8)
    run(opt, params, range(10))
    run(ref, ref_params, range(10))
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS + ["block"])
def test_density_zero_equals_sign_sgd(kind):
    params = make_params(dtype=torch.float64)
    if kind != "randk":
        params = [p for p in params if p.dim() == 2]
    lr, wd = 1e-2, 0.1
    opt = FRUGAL([{"params": params, "density": 0.0, "proj_type": kind}], lr=lr, weight_decay=wd)
    for k in range(4):
        before = [p.detach().clone() for p in params]
        set_grads(params, k)
        grads = [p.grad.clone() for p in params]
        opt.step()
        for p, w, g in zip(params, before, grads):
            expected = w * (1 - lr * wd) - lr * torch.sign(g.float()).double()
            assert torch.equal(p.detach(), expected)
    assert all(not any(k.startswith("exp_avg") for k in opt.state[p]) for p in params)


def test_switch_resets_moments_and_bias_correction():
    w = torch.nn.Parameter(torch.randn(12, 20))
    opt = FRUGAL([{"params": [w], "density": 0.25, "proj_type": "columns", "update_proj_gap": 3}], lr=1e-3)
    for k in range(3):
        w.grad = torch.randn(12, 20)
        opt.step()
    state = opt.state[w]
    assert state["adam_step"] == 3
    old_idx = state["idx"].clone()
    g = torch.randn(12, 20)
    w.grad = g.clone()
    opt.step()  # k = 3: a switch, moments restart from zero, t_adam restarts at 1
    assert state["adam_step"] == 1 and not torch.equal(state["idx"], old_idx)
    torch.testing.assert_close(state["exp_avg"], 0.1 * g[:, state["idx"]])
    torch.testing.assert_close(state["exp_avg_sq"], 0.001 * g[:, state["idx"]] ** 2)


def test_no_reset_keeps_moments_and_step():
    w = torch.nn.Parameter(torch.randn(12, 20))
    opt = FRUGAL([{"params": [w], "density": 0.25, "proj_type": "svd", "update_proj_gap": 2,
                   "reset_statistics": False}], lr=1e-3)
    for _ in range(5):
        w.grad = torch.randn(12, 20)
        opt.step()
    assert opt.state[w]["adam_step"] == 5


def test_blocks_active_count_and_descending_cycle():
    params = [torch.nn.Parameter(torch.randn(6, 4)) for _ in range(8)]
    opt = FRUGAL([{"params": params, "density": 0.25, "proj_type": "block", "update_proj_gap": 2}], lr=1e-3)
    seen = []
    for k in range(8):  # 4 switches x 2 active = all 8 tensors, last ones first
        for p in params:
            p.grad = torch.randn(6, 4)
        opt.step()
        active = [i for i, p in enumerate(params) if "exp_avg" in opt.state[p]]
        assert len(active) == round(0.25 * 8)
        if k % 2 == 0:
            seen.append(active)
    assert seen[0] == [6, 7] and seen[1] == [4, 5]
    assert sorted(i for a in seen for i in a) == list(range(8))


def test_random_choices_use_a_private_seeded_generator():
    before = torch.get_rng_state()
    picks = []
    for seed in (0, 0, 1):
        w = torch.nn.Parameter(torch.randn(8, 40))
        opt = FRUGAL([{"params": [w], "density": 0.25, "proj_type": "columns"}], seed=seed)
        w.grad = torch.randn(8, 40, generator=torch.Generator().manual_seed(5))
        opt.step()
        picks.append(opt.state[w]["idx"])
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])  # same seed, same subspace
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    torch.randn(8, 40), torch.randn(8, 40), torch.randn(8, 40)  # the test's own three draws
    assert torch.equal(after, torch.get_rng_state())  # the optimizer drew nothing from the global RNG


@pytest.mark.parametrize("kind", KINDS + ["block"])
def test_state_dict_round_trip_across_switch_is_bitwise(kind):
    def build(ps):
        groups = groups_for(ps, density=0.3, proj_type=kind, update_proj_gap=3, block_order="random")
        if kind == "randk":
            groups = [{"params": ps, "density": 0.3, "proj_type": "randk", "update_proj_gap": 3}]
        return FRUGAL(groups, lr=1e-2, weight_decay=0.05, seed=3)

    check_resume(build, split=4, total=8)


def test_registry_defaults(tiny_model):
    from lowmem import create_optimizer

    opt = create_optimizer(tiny_model(), "frugal", lr=1e-3, density=0.5, proj_type="columns")
    assert opt.param_groups[0]["density"] == 0.5 and opt.param_groups[0]["update_proj_gap"] == 200


@pytest.mark.parametrize("key,value", [("density", 1.5), ("proj_type", "diag"), ("update_proj_gap", 0),
                                       ("inactive_update_rule", "same")])
def test_bad_group_values_raise_value_error(key, value):
    with pytest.raises(ValueError, match=f"optim.args.{key}"):
        FRUGAL(groups_for(make_params(), **{"density": 0.25, key: value}))
