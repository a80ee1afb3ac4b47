"""ZO-AdaMU against Algorithm 1 written out densely (every m stored), the quadratic's gradient,
MeZO in phase 1, the reference code's schedule simulated call by call, and measured memory."""

import io
import math

import pytest
import torch
from _zo_helpers import PeakLiveBytes, Quadratic, lm_closure

from lowmem.memory import state_bytes
from lowmem.optim import create_optimizer
from lowmem.optim.mezo import MeZO
from lowmem.optim.zo_adamu import ZOAdaMU, anneal
from lowmem.optim.zo_noise import mix_seed, param_seed


def _reference_code_schedule(steps, t1, t2, t3, varphi):
    """The released ``_ema_weight`` (stateful ``limit_steps``), called once per step."""
    limit, out = t3, []
    for step in range(steps):
        if step < t1:
            out.append(1.0)
        elif step < t2:
            out.append(0.5 * (1 + math.cos(math.pi * ((step - t1) / limit))))
            limit -= varphi * (t3 - t2) / (t2 - t1)
        else:
            out.append(0.5 * (1 + math.cos(math.pi * ((t2 - t1) / limit))))
    return out


@pytest.mark.parametrize("varphi", [1.0, 0.1, 1.5])
def test_schedule_is_the_code_formula_once_per_step_continuous_and_constant(varphi):
    t1, t2, t3 = 10, 80, 100
    ours = [anneal(k, t1, t2, t3, varphi) for k in range(120)]
    assert ours == pytest.approx(_reference_code_schedule(120, t1, t2, t3, varphi), rel=1e-12, abs=1e-12)
    assert ours[t1] == 1.0 and abs(ours[t1 + 1] - 1.0) < 1e-2  # continuous at T1
    assert len(set(ours[t2:])) == 1 and abs(ours[t2 - 1] - ours[t2]) < 0.05  # constant from T2
    finals = [anneal(16000, 1024, 16000, 20000, f) for f in (1.0, 0.1, 1.5)]
    assert finals == pytest.approx([0.0101, 0.131, 0.0119], abs=1e-3)  # lowmem.optim.zo_adamu docstring, Anneal


class DenseAdaMU:
    """Algorithm 1 with every m stored (fp64), driven by the optimizer's step seeds."""

    def __init__(self, model: Quadratic, opt: ZOAdaMU, lr: float, wd: float):
        self.params, self.opt, self.lr, self.wd = [model.w, model.b], opt, lr, wd
        self.theta = [p.detach().clone() for p in self.params]
        self.m = [torch.zeros_like(p) for p in self.params]

    def draws(self, seed: int, k: int):
        """Algorithm 1's ``zdot ~ N(0, alpha)``, ``zdd ~ N(m, 1 - alpha)`` from the unit normals
        ``u, u'`` that the optimizer's two seeded draws ``w, r`` are rotated into."""
        alpha, b1, b2 = self.opt.schedule(k)
        a, c = b1 * math.sqrt(alpha), (1 - b1) * math.sqrt(1 - alpha)
        sigma = math.hypot(a, c)
        draw = self.opt.noise.draw  # the optimizer's noise kind, regenerated from the seeds
        zdot, zdd = [], []
        for i, p in enumerate(self.params):
            w, r = draw(p, param_seed(seed, 0, i)), draw(p, mix_seed(seed, 0, i, 1))
            u, u2 = ((a * w + c * r) / sigma, (c * w - a * r) / sigma) if sigma > 0 else (w, -r)
            zdot.append(math.sqrt(alpha) * u)
            zdd.append(self.m[i] + math.sqrt(1 - alpha) * u2)
        return zdot, zdd, b1, b2

    def perturbation(self, seed: int, k: int) -> torch.Tensor:
        zdot, zdd, b1, _ = self.draws(seed, k)
        return torch.cat([(b1 * a + (1 - b1) * b).flatten() for a, b in zip(zdot, zdd)])

    def update(self, seed: int, k: int, g: float) -> None:
        zdot, zdd, b1, b2 = self.draws(seed, k)
        for i in range(2):
            self.m[i] = b1 * zdot[i] + (1 - b1) * zdd[i]
            v = b2 * zdot[i] ** 2 + (1 - b2) * zdd[i] ** 2
            self.theta[i] = self.theta[i] - self.lr * (g * self.m[i] / torch.sqrt(v + 1e-8) + self.wd * self.theta[i])


@pytest.mark.parametrize("noise", ["gaussian", "philox"])
def test_trajectory_equals_dense_algorithm_1_through_all_phases(noise):
    kw = dict(lr=0.01, eps=1e-4, weight_decay=0.1, total_steps=12, t1=3, t2=8, seed=4, noise=noise)
    model = Quadratic()
    opt = ZOAdaMU(model.parameters(), **kw)
    dense = DenseAdaMU(Quadratic(), opt, lr=0.01, wd=0.1)
    for k in range(14):
        grad_before = model.grad()
        opt.step(model)
        seed, g = opt.last_step_seed, opt.last_projected_grads[0]
        # the perturbation the forwards saw is Algorithm 1's z: g = z . grad (exact on a quadratic)
        assert g == pytest.approx(float(dense.perturbation(seed, k) @ grad_before), rel=1e-6), k
        dense.update(seed, k, g)
        torch.testing.assert_close(model.w, dense.theta[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model.b, dense.theta[1], rtol=1e-10, atol=1e-10)
        assert ("m" in opt.state[model.w]) == (opt.schedule(k)[1] < 1.0)  # buffer only after phase 1


@pytest.mark.parametrize("alpha, b1", [(0.3, 0.6), (0.01, 0.13), (0.9, 0.05)])
def test_moments_have_algorithm_1_distribution(alpha, b1):
    """From the rotated draws: zdot ~ N(0, alpha) and zdd - m ~ N(0, 1 - alpha), independent, and
    m_k = b1 zdot + (1 - b1) zdd (the perturbation), over 2^20 elements."""
    p = torch.zeros(1 << 20, dtype=torch.float64)
    opt = ZOAdaMU([p], lr=0.0, total_steps=10, t1=0, t2=5)
    m_prev = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opt.state[p]["m"] = m_prev.clone()
    b2 = 0.5
    m, v = opt._moments(p, 0, 123, (alpha, b1, b2))
    # invert: zdot and zdd from m and v (v = b2 zdot^2 + (1-b2) zdd^2) is not unique, so regenerate w, r
    w, r = opt.noise.draw(p, param_seed(123, 0, 0)), opt.noise.draw(p, mix_seed(123, 0, 0, 1))
    sigma, cos, sin = opt._mix(alpha, b1)
    zdot = math.sqrt(alpha) * (cos * w + sin * r)
    noise = math.sqrt(1 - alpha) * (sin * w - cos * r)  # zdd - m_prev
    torch.testing.assert_close(m, b1 * zdot + (1 - b1) * (m_prev + noise))
    torch.testing.assert_close(v, b2 * zdot ** 2 + (1 - b2) * (m_prev + noise) ** 2)
    cov = torch.cov(torch.stack([zdot, noise]))
    n = p.numel()
    assert cov[0, 0].item() == pytest.approx(alpha, abs=6 * alpha * math.sqrt(2 / n))
    assert cov[1, 1].item() == pytest.approx(1 - alpha, abs=6 * (1 - alpha) * math.sqrt(2 / n))
    assert abs(cov[0, 1].item()) < 6 * math.sqrt(alpha * (1 - alpha) / n)


@pytest.mark.parametrize("noise", ["gaussian", "philox"])  # philox in fp32: the kernel (interpreted on CPU)
def test_phase_1_perturbs_like_mezo_and_updates_by_normalised_zdot(noise, request):
    if noise == "philox":
        request.getfixturevalue("triton_interpreter")
    model, twin = Quadratic(dtype=torch.float32), Quadratic(dtype=torch.float32)
    adamu = ZOAdaMU(model.parameters(), lr=1e-2, eps=1e-3, seed=9, t1=100, total_steps=1000, noise=noise)
    mezo = MeZO(twin.parameters(), lr=0.0, eps=1e-3, seed=9, noise=noise)
    before = [p.detach().clone() for p in (model.w, model.b)]
    adamu.step(model)
    mezo.step(twin)
    assert adamu.last_projected_grads == mezo.last_projected_grads  # same z = zdot, same forwards
    g = adamu.last_projected_grads[0]
    for i, (p, q, p0) in enumerate(zip((model.w, model.b), (twin.w, twin.b), before)):
        zdot = adamu.noise.draw(p0, param_seed(adamu.last_step_seed, 0, i))
        torch.testing.assert_close(p.detach(), q.detach() - 1e-2 * g * zdot / torch.sqrt(zdot ** 2 + 1e-8))
    assert state_bytes(adamu) == 0


def test_no_grad_global_rng_and_memory(tiny_model, tiny_batch):
    model, batch = tiny_model().eval(), tiny_batch(batch=4, seq=32)
    opt = ZOAdaMU(model.parameters(), lr=1e-4, t1=0, t2=3, total_steps=4, momentum_dtype="bfloat16")
    rng = torch.get_rng_state()
    with torch.no_grad(), PeakLiveBytes() as inference:
        model(**batch).loss
    opt.step(lm_closure(model, batch))  # phase 1: no buffer
    assert state_bytes(opt) == 0
    with PeakLiveBytes() as zo:
        opt.step(lm_closure(model, batch))  # allocates the bf16 momentum
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    n_bytes = sum(p.numel() for p in model.parameters()) * 2
    assert state_bytes(opt) == n_bytes  # one bf16 buffer per parameter
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert zo.peak <= max(inference.peak, 3 * largest) + n_bytes + 1024


def test_int8_momentum_is_blockwise_quantized_m_and_a_quarter_of_the_memory():
    """momentum_dtype int8: the stored m is the fp32 m quantized blockwise (MomentStore, the
    8-bit optimizers' own), perturbation and update both read it, and it costs ~1/4 of fp32."""
    from lowmem.optim.state_store import MomentStore

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(100))]  # 8192 / 100 values
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-3, eps=1e-3, total_steps=6, t1=1, t2=4, seed=2)
    opt8, opt32 = ZOAdaMU(params, momentum_dtype="int8", **kw), ZOAdaMU(twin, momentum_dtype="float32", **kw)
    closure = lambda ps: (lambda: sum((p.float() ** 2).sum() * (i + 1) for i, p in enumerate(ps)))  # noqa: E731
    opt8.step(closure(params)), opt32.step(closure(twin))  # phase 1: nothing stored
    assert state_bytes(opt8) == 0
    for _ in range(3):
        opt8.step(closure(params))
        opt32.step(closure(twin))
    big, small = opt8.state[params[0]], opt8.state[params[1]]
    assert big["m_codes"].dtype == torch.uint8 and "m" not in big and small["m"].dtype == torch.float32
    m8 = MomentStore(bits=8).load(big, "m", params[0].shape, signed=True)
    m32 = opt32.state[twin[0]]["m"]
    assert (m8 - m32).abs().max() <= 0.05 * m32.abs().max()  # close, though the walks differ by rounding
    assert state_bytes(opt8) == 8192 + 4 * 8192 // 256 + 4 * 100  # codes, absmax, the small fp32 m
    # lr 0: each perturbation is undone by the restore, which reads the same stored m
    start = [torch.randn(64, 128), torch.randn(100)]
    still = [torch.nn.Parameter(t.clone()) for t in start]
    opt0 = ZOAdaMU(still, momentum_dtype="int8", **{**kw, "lr": 0.0})
    for _ in range(4):
        opt0.step(closure(still))
    assert "m_codes" in opt0.state[still[0]]
    for p, t in zip(still, start):  # rounding only: 4 steps of 9 fp32 roundings (3 adds per perturbation)
        ulp = torch.finfo(torch.float32).eps * t.abs().clamp_min(1.0)
        assert ((p.detach() - t).abs() <= 4 * 9 * ulp).all()  # a restore reading another m would be ~eps * m


@pytest.mark.parametrize("momentum_dtype", [None, "int8"])
def test_state_dict_round_trip_across_the_phase_boundary(tiny_model, tiny_batch, momentum_dtype):
    batch = tiny_batch()
    kw = dict(lr=1e-3, eps=1e-3, total_steps=8, t1=2, t2=5, seed=3, momentum_dtype=momentum_dtype)

    def run(model, opt, steps):
        return [float(opt.step(lm_closure(model, batch))) for _ in range(steps)]

    model_a = tiny_model().eval()
    losses_a = run(model_a, ZOAdaMU(model_a.parameters(), **kw), 7)
    for split in (2, 4):  # resume right at T1 (no buffer, regenerated m) and inside phase 2
        model_b = tiny_model().eval()
        opt_b = ZOAdaMU(model_b.parameters(), **kw)
        losses_b = run(model_b, opt_b, split)
        buf = io.BytesIO()
        torch.save(opt_b.state_dict(), buf)
        buf.seek(0)
        opt_c = ZOAdaMU(model_b.parameters(), **kw)
        opt_c.load_state_dict(torch.load(buf, weights_only=True))
        losses_b += run(model_b, opt_c, 7 - split)
        assert losses_a == losses_b, split
        assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    if momentum_dtype == "int8":  # read back as fp32 momentum it would silently restart: refused
        with pytest.raises(ValueError, match="momentum_dtype"):
            ZOAdaMU(model_b.parameters(), **{**kw, "momentum_dtype": None}).load_state_dict(opt_c.state_dict())


def test_registry_and_bad_arguments(tiny_model):
    model = tiny_model()
    opt = create_optimizer(model, "zo_adamu", lr=1e-4, total_steps=100)
    assert opt.zeroth_order and opt.t2 == 80
    params = list(model.parameters())
    for kw, field in [({"t1": 90, "t2": 80, "total_steps": 100}, "t1"), ({"phi": (1.0, 0.1)}, "phi"),
                      ({"phi": (1.0, 0.1, 6.0)}, "phi"), ({"momentum_dtype": "int4"}, "momentum_dtype"),
                      ({"eps": -1.0}, "eps")]:
        with pytest.raises(ValueError, match=field):
            ZOAdaMU(params, **kw)
