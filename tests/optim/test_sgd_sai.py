"""SGD-SaI against the PyPI reference sgd-sai 1.0.3, the g-SNR rule, the pitfall fixes, 8-bit, resume."""

import pytest
import torch

from _compress_helpers import check_resume, make_params, model_trajectory, run, set_grads, twin_models
from lowmem.optim.registry import create_optimizer
from lowmem.optim.sgd_sai import SGDSaI, gradient_snr

sgd_sai = pytest.importorskip("sgd_sai")


def plain_groups(opt) -> list[dict]:
    """The same param groups (and per-group weight decay) without lowmem's ``param_names``."""
    return [{k: v for k, v in g.items() if k != "param_names"} for g in opt.param_groups]


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_matches_sgd_sai_package_on_tiny_llama_fp64(tiny_model, tiny_batch, momentum):
    """Six fp64 steps through the registry's groups (weight decay off for norms) equal SGD_sai on the
    same groups, bit for bit; the losses too."""
    ours_model, ref_model = twin_models(tiny_model, dtype=torch.float64)
    ours = create_optimizer(ours_model, "sgd_sai", lr=3e-2, momentum=momentum, weight_decay=0.1)
    ref_groups = plain_groups(ours)
    names = {id(p): n for n, p in ours_model.named_parameters()}
    ref_params = dict(ref_model.named_parameters())
    for g in ref_groups:
        g["params"] = [ref_params[names[id(p)]] for p in g["params"]]
    ref = sgd_sai.SGD_sai(ref_groups, lr=3e-2, momentum=momentum, weight_decay=0.1)
    batches = [tiny_batch(seed=s) for s in range(6)]
    assert torch.equal(torch.stack(model_trajectory(ours_model, ours, batches)),
                       torch.stack(model_trajectory(ref_model, ref, batches)))
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name
    for p, p_ref in zip(ours_model.parameters(), ref_model.parameters()):
        assert torch.equal(ours.state[p]["gsnr"], ref.state[p_ref]["gsnr"])


def test_gsnr_is_taken_once_from_the_first_gradient():
    params = make_params(dtype=torch.float64)
    opt = SGDSaI([{"params": params}], lr=1e-2)
    set_grads(params, 0)
    first = {id(p): (p.grad.norm() / (p.grad.std() + 1e-8)) for p in params}
    opt.step()
    for p in params:
        assert torch.equal(opt.state[p]["gsnr"], first[id(p)])
    run(opt, params, range(1, 4))
    for p in params:
        assert torch.equal(opt.state[p]["gsnr"], first[id(p)])


def test_two_step_trajectory_follows_the_formula():
    w0 = torch.randn(6, 5, dtype=torch.float64)
    g1, g2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    lr, mu, wd, eps = 0.05, 0.8, 0.1, 1e-8
    w = torch.nn.Parameter(w0.clone())
    opt = SGDSaI([w], lr=lr, momentum=mu, weight_decay=wd, eps=eps)
    gsnr = float(g1.norm() / (g1.std() + eps))
    expected = w0 * (1 - lr * wd) - lr * gsnr * g1  # buf = g1, no (1-mu) factor
    buf = mu * g1 + (1 - mu) * g2
    expected = expected * (1 - lr * wd) - lr * gsnr * buf
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=1e-14)


def test_pitfall_rules():
    """momentum 0 is plain scaled SGD with no buffer; a 1-element tensor gets gsnr 1; a parameter
    whose first gradient comes late or is all zero takes its g-SNR from its first non-zero gradient."""
    a, b, c = (torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(3))
    one = torch.nn.Parameter(torch.randn(1, dtype=torch.float64))
    opt = SGDSaI([a, b, c, one], lr=0.1, momentum=0.0, weight_decay=0.0)
    ga, gone = torch.randn(4, 3, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    a0, one0, c0 = a.detach().clone(), one.detach().clone(), c.detach().clone()
    a.grad, one.grad, c.grad = ga.clone(), gone.clone(), torch.zeros(4, 3, dtype=torch.float64)
    opt.step()  # b has no gradient, c an all-zero one
    torch.testing.assert_close(a.detach(), a0 - 0.1 * gradient_snr(ga, 1e-8) * ga, rtol=1e-14, atol=0)
    torch.testing.assert_close(one.detach(), one0 - 0.1 * gone, rtol=1e-14, atol=0)
    assert set(opt.state[a]) == {"gsnr"} and b not in opt.state and c not in opt.state
    assert torch.equal(c.detach(), c0)
    gb = torch.randn(4, 3, dtype=torch.float64)
    b.grad, c.grad = gb.clone(), gb.clone()
    opt.step()  # no KeyError: b and c take their g-SNR now
    for p in (b, c):
        assert torch.equal(opt.state[p]["gsnr"], gb.norm() / (gb.std() + 1e-8))


def test_eight_bit_buffer_is_a_quarter_and_tracks_fp32():
    torch.manual_seed(0)
    params32 = [torch.nn.Parameter(torch.randn(128, 64)) for _ in range(2)]
    params8 = [torch.nn.Parameter(p.detach().clone()) for p in params32]
    start = [p.detach().clone() for p in params32]
    opt32, opt8 = SGDSaI(params32, lr=1e-3), SGDSaI(params8, lr=1e-3, state_bits=8)
    run(opt32, params32, range(5))
    run(opt8, params8, range(5))
    bytes32 = sum(t.numel() * t.element_size() for s in opt32.state.values() for k, t in s.items() if k != "gsnr")
    codes = sum(s["momentum_buffer_codes"].numel() for s in opt8.state.values())
    assert codes * 4 == bytes32 and "momentum_buffer" not in opt8.state[params8[0]]
    for a, b, a0 in zip(params32, params8, start):  # blockwise 8-bit: ~1% of the displacement
        assert 0 < (a - b).norm() < 0.02 * (a - a0).norm()


@pytest.mark.parametrize("state_bits,momentum", [(32, 0.9), (8, 0.9), (32, 0.0)])
def test_resume_is_bit_exact(state_bits, momentum):
    shapes = [(80, 64), (10, 24), (7,), (1,)]
    check_resume(lambda ps: SGDSaI(ps, lr=1e-2, momentum=momentum, state_bits=state_bits), 3, 6, shapes=shapes)
