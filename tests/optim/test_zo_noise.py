"""The perturbation kinds (lowmem.optim.zo_noise): regenerated from the seed alone, independent of the
thread count, the right distribution, and an unbiased two-point estimate on a quadratic for each kind."""

import pytest
import torch
from _zo_helpers import Quadratic

import lowmem.optim.zo_noise as zo_noise
from lowmem.optim.mezo import MeZO
from lowmem.optim.zo_noise import CHUNK, Noise, noise_table

KINDS = ["gaussian", "rademacher", "table"]


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
    monkeypatch.setattr(zo_noise, "TABLE_SIZE", 1024)
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
    with pytest.raises(ValueError, match="optim.args.noise: one of gaussian, rademacher, table"):
        MeZO(tiny_model().parameters(), noise="uniform")
