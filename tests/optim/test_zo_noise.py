"""The perturbation kinds (lowmem.optim.zo_noise): regenerated from the seed alone, independent of the
thread count, the right distribution, and an unbiased two-point estimate on a quadratic for each kind."""

import pytest
import torch
from _zo_helpers import Quadratic

import lowmem.optim.zo_keyed as zo_keyed
import lowmem.optim.zo_noise as zo_noise
from lowmem.optim.mezo import MeZO
from lowmem.optim.zo_noise import CHUNK, Noise, noise_table

KINDS = ["gaussian", "rademacher", "table", "philox"]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_z_whatever_the_threads_and_the_call(kind):
    like = torch.empty(3 * CHUNK + 5)  # several chunks and a ragged end
    noise = Noise(kind)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = noise.draw(like, 123)
        torch.set_num_threads(2)
        two = noise.draw(like, 123)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(noise.view(like, 123), one)
    assert not torch.equal(noise.draw(like, 124), one)
    small = torch.empty(5, 7, dtype=torch.float64)
    assert torch.equal(noise.draw(small, 9), noise.view(small, 9)) and noise.draw(small, 9).shape == (5, 7)


@pytest.mark.parametrize("kind", KINDS)
def test_moments(kind):
    z = Noise(kind).draw(torch.empty(1 << 20), 5).double()
    assert abs(z.mean().item()) < 5 / 2**10  # 5 standard errors
    assert abs(z.var().item() - 1) < 0.01
    if kind == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    else:  # Gaussian fourth moment 3 (Rademacher: 1)
        assert abs((z**4).mean().item() - 3) < 0.05


def test_table_slices_at_seeded_offsets_and_windows_beyond_its_size(monkeypatch):
    monkeypatch.setattr(zo_keyed, "TABLE_SIZE", 1024)
    table = noise_table(torch.device("cpu"), torch.float32)
    assert table.numel() == 1024
    noise = Noise("table")
    z = noise.view(torch.empty(100), 777)
    offset = 777 % (1024 - 100 + 1)
    assert torch.equal(z, table[offset:offset + 100])
    big = noise.draw(torch.empty(2000), 3)  # windows of 512 at offsets mix(seed, k)
    for k, start in enumerate(range(0, 2000, 512)):
        m = min(512, 2000 - start)
        o = zo_noise.mix_seed(3, k) % (1024 - m + 1)
        assert torch.equal(big[start:start + m], table[o:o + m])


@pytest.mark.parametrize("kind", ["rademacher", "table"])
def test_two_point_estimate_is_unbiased_for_each_kind(kind):
    """E[g z] = E[z z^T] grad = grad: the Monte-Carlo mean of g z approaches the gradient."""
    model = Quadratic(shape=(2, 3), bias=2)
    opt = MeZO(model.parameters(), lr=0.0, eps=1e-3, seed=11, noise=kind)
    samples = []
    for _ in range(3000):
        opt.step(model)
        z = torch.cat([opt.noise.draw(p, zo_noise.param_seed(opt.last_step_seed, 0, i)).flatten()
                       for i, p in enumerate([model.w, model.b])])
        assert opt.last_projected_grads[0] == pytest.approx(float(z @ model.grad()), rel=1e-6, abs=1e-8)
        samples.append(opt.last_projected_grads[0] * z)
    samples = torch.stack(samples)
    mean, stderr = samples.mean(0), samples.std(0) / len(samples) ** 0.5
    grad = model.grad()
    assert (stderr < 0.2 * grad.norm()).all()
    assert ((mean - grad).abs() < 5 * stderr).all()


def test_unknown_kind_is_a_one_line_error(tiny_model):
    with pytest.raises(ValueError, match="optim.args.noise: one of gaussian, rademacher, table, philox, got"):
        MeZO(tiny_model().parameters(), noise="uniform")


# ---- philox (issue #17): the kernel in place (interpreted here), its reference elsewhere ----------------

@pytest.mark.usefixtures("triton_interpreter")
def test_philox_z_is_the_reference_counter_based_normal():
    from lowmem.kernels.perturb import philox_normal

    like = torch.empty(3, 4097)
    torch.testing.assert_close(Noise("philox").draw(like, 77).flatten(), philox_normal(77, 0, like.numel()),
                               rtol=4e-6, atol=4e-6)
    assert isinstance(Noise("philox"), zo_noise.PhiloxNoise) and Noise("philox").kind == "philox"


def _mezo_run(tiny_model, tiny_batch, steps, **kw):
    from _zo_helpers import lm_closure

    model, batch = tiny_model().eval(), tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), noise="philox", **kw)
    log = []
    for _ in range(steps):
        opt.step(lm_closure(model, batch))
        log.append((opt.last_step_seed, opt.last_projected_grads))
    return model, opt, before, log


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_philox_same_z_for_plus_minus_and_update(tiny_model, tiny_batch, momentum):
    """The fused step (restore inside the update's launch) equals +eps, -2 eps, +eps and a separate
    update with z regenerated four times, bit for bit; and the update is theta - lr (g z + wd theta)."""
    kw = dict(lr=1e-2, eps=1e-3, weight_decay=0.1, momentum=momentum, seed=5)
    model, opt, before, log = _mezo_run(tiny_model, tiny_batch, 2, **kw)
    twin = tiny_model().eval()
    replay = MeZO(twin.parameters(), noise="philox", **kw)
    for step_seed, gs in log:
        assert replay.draw_step_seed() == step_seed
        replay.replay(step_seed, gs)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    if momentum:
        return
    one, opt1, before1, ((seed, (g,)),) = _mezo_run(tiny_model, tiny_batch, 1, **kw)
    for i, (p, p0) in enumerate(zip(one.parameters(), before1)):
        z = opt1.noise.draw(p0, zo_noise.param_seed(seed, 0, i))
        ideal = p0 - 1e-2 * (g * z + 0.1 * p0)
        torch.testing.assert_close(p.detach(), ideal, rtol=0, atol=4e-7 * (1 + p0.abs().max().item()))


@pytest.mark.usefixtures("triton_interpreter")
def test_philox_with_lr_0_returns_theta_within_the_rounding_bound(tiny_model, tiny_batch):
    """lr 0: +eps z, -2 eps z, +eps z (and -0 z): |theta - theta0| <= 2^-24 (3 |theta0| + 6 eps |z|)
    per step (tests/kernels/test_perturb.py derives the bound); over 3 steps three times that."""
    eps = 1e-2
    model, opt, before, log = _mezo_run(tiny_model, tiny_batch, 3, lr=0.0, eps=eps)
    for i, (p, p0) in enumerate(zip(model.parameters(), before)):
        zmax = max(opt.noise.draw(p0, zo_noise.param_seed(s, 0, i)).abs().max().item() for s, _ in log)
        bound = 3 * 2.0**-24 * (3 * (p0.abs() + 3 * eps * zmax) + 6 * eps * zmax) * 1.001
        assert ((p.detach() - p0).abs() <= bound).all(), i


def test_philox_under_fake_tensors_runs_nothing_and_allocates_no_buffer():
    """The planner's trace (fake CUDA tensors): the kernel cannot run on them, and allocates nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    noise = Noise("philox")
    with FakeTensorMode():
        p = torch.zeros(4096, device="cuda")
        noise.add_(p, 3, 1e-3)
        zo_noise.sgd_update_(p, 3, 1e-3, 0.5, 0.1, restore=1e-3, noise=noise)
        assert noise.draw(p, 3).shape == p.shape
