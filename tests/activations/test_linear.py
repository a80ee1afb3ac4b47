"""The WTA-CRS layer against the exact dense gradients: Monte-Carlo mean of ∂W within a confidence
bound, variance below plain CRS at the same budget, exact ∂x and ∂b, saved bytes, dtypes."""

import pytest
import torch
from torch import nn

from lowmem.activations import apply_wta_crs
from lowmem.memory import SavedTensorMeter

B, L, D_IN, D_OUT = 2, 32, 16, 8  # N = 64 rows, k = 19 at keep_ratio 0.3


def _layer(keep_ratio=0.3, seed=0, momentum=None, bias=True):
    torch.manual_seed(0)
    holder = nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(D_IN, D_OUT, bias=bias))]))
    handle = apply_wta_crs(holder, keep_ratio, targets=["*"], seed=seed, grad_norm_momentum=momentum)
    return holder[0][0][0], handle


def _data():
    gen = torch.Generator().manual_seed(3)
    scale = torch.rand(B, L, 1, generator=gen) ** 4 * 10  # heavy-tailed row norms: winners exist
    x = torch.randn(B, L, D_IN, generator=gen) * scale
    gy = torch.randn(B, L, D_OUT, generator=gen) * (torch.arange(L) < L // 2).view(1, L, 1)  # masked half
    return x, gy


def _grads(layer, x, gy):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    layer(x).backward(gy)
    return layer.weight.grad.clone(), x.grad, layer.bias.grad


def _monte_carlo(layer, x, gy, reps):
    samples = torch.stack([_grads(layer, x, gy)[0] for _ in range(reps)]).double()
    return samples.mean(0), samples.var(0)


@pytest.mark.parametrize("momentum", [None, 0.0])
def test_weight_gradient_is_unbiased(momentum):
    """The mean of R sampled ∂W is within 5 standard errors of gyᵀx in every entry, and the
    normalised squared errors average about 1 (a bias would inflate them)."""
    layer, _ = _layer(momentum=momentum)
    x, gy = _data()
    exact = gy.reshape(-1, D_OUT).t().double() @ x.reshape(-1, D_IN).double()
    if momentum is not None:
        _grads(layer, x, gy)  # one backward: p now uses the gradient norms ("epoch >= 2")
    reps = 3000
    mean, var = _monte_carlo(layer, x, gy, reps)
    z = (mean - exact) / (var / reps).sqrt().clamp_min(1e-12)
    assert z.abs().max() < 5.0
    assert 0.6 < (z ** 2).mean() < 1.5


def _plain_crs_variance(x, gy, k, reps):
    """Column-row sampling with replacement, p ∝ ||x_i||·||gy_i|| (the best CRS), same budget k."""
    x2, g2 = x.reshape(-1, D_IN).double(), gy.reshape(-1, D_OUT).double()
    prob = x2.norm(dim=1) * g2.norm(dim=1)
    prob /= prob.sum()
    gen = torch.Generator().manual_seed(5)
    est = []
    for _ in range(reps):
        idx = torch.multinomial(prob, k, replacement=True, generator=gen)
        est.append((g2[idx] / (k * prob[idx, None])).t() @ x2[idx])
    return torch.stack(est).var(0)


def test_variance_below_plain_crs_at_same_budget():
    layer, _ = _layer(momentum=0.0)
    x, gy = _data()
    _grads(layer, x, gy)  # gradient norms known, as for CRS
    reps = 1500
    _, var_wta = _monte_carlo(layer, x, gy, reps)
    var_crs = _plain_crs_variance(x, gy, k=19, reps=reps)
    assert var_wta.sum() < 0.8 * var_crs.sum()


def test_reference_epoch_one_estimator_is_biased():
    """The reference's epoch-1 rule (no 1/(s·p) reweighting) fails the bound the layer passes."""
    x, gy = _data()
    x2, g2 = x.reshape(-1, D_IN), gy.reshape(-1, D_OUT)
    exact = g2.t() @ x2
    prob = x2.norm(dim=1) / x2.norm(dim=1).sum()
    gen = torch.Generator().manual_seed(0)
    k, reps = 19, 1000
    est = torch.stack([g2[i].t() @ x2[i] for i in
                       (torch.multinomial(prob, k, replacement=False, generator=gen) for _ in range(reps))])
    z = (est.mean(0) - exact) / (est.var(0) / reps).sqrt().clamp_min(1e-12)
    assert z.abs().max() > 10
    relative_bias = (est.mean(0) - exact).norm() / exact.norm()
    assert relative_bias > 0.1  # about 0.2 here


def test_input_and_bias_gradients_are_exact():
    layer, _ = _layer(keep_ratio=0.1)
    x, gy = _data()
    _, gx, gb = _grads(layer, x, gy)
    assert torch.allclose(gx, gy @ layer.weight, rtol=0, atol=0)
    assert torch.equal(gb, gy.reshape(-1, D_OUT).sum(0))


def test_keep_ratio_one_and_no_grad_paths_are_the_plain_layer():
    x, gy = _data()
    plain = nn.Linear(D_IN, D_OUT)
    layer, handle = _layer(keep_ratio=1.0)
    plain.load_state_dict(layer.state_dict())
    for a, b in zip(_grads(layer, x, gy), _grads(plain, x, gy)):
        assert torch.equal(a, b)
    layer, handle = _layer(keep_ratio=0.3)
    state = handle.generator.get_state()
    layer.eval()
    _grads(layer, x, gy)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    assert torch.equal(handle.generator.get_state(), state), "eval / no-grad forwards must not sample"


def _saved_bytes(layer, x):
    meter = SavedTensorMeter()
    with meter.measure():
        layer(x.requires_grad_(True))
    return meter.bytes - layer.weight.untyped_storage().nbytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activation_bytes_scale_with_keep_ratio(dtype):
    x = torch.randn(4, 256, 64, dtype=dtype)  # N = 1024 rows
    full, _ = _layer(keep_ratio=1.0)
    layer, _ = _layer(keep_ratio=0.25)
    full.weight.data = torch.randn(D_OUT, 64, dtype=dtype)
    full.bias.data = full.bias.data.to(dtype)
    layer.weight, layer.bias = full.weight, full.bias
    plain_bytes, wta_bytes = _saved_bytes(full, x), _saved_bytes(layer, x)
    assert plain_bytes == x.numel() * x.element_size()
    k = 256
    per_row = 64 * x.element_size() + 8 + 4  # row + int64 index + fp32 weight
    assert 0.5 * k * 64 * x.element_size() < wta_bytes <= k * per_row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layers_and_autocast(dtype):
    x, gy = _data()
    layer, _ = _layer()
    exact = gy.reshape(-1, D_OUT).t() @ x.reshape(-1, D_IN)
    layer.to(dtype)
    gw, gx, _ = _grads(layer, x.to(dtype), gy.to(dtype))
    assert gw.dtype == dtype and gx.dtype == dtype and torch.isfinite(gw).all()
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gw, _, _ = _grads(layer, x, gy)
    assert gw.dtype == torch.float32  # flows back to the fp32 master weight
    # one sample is noisy but of the right size (a wrong scale would be off by ~1/keep_ratio)
    assert 0.2 < gw.norm() / exact.norm() < 5


@pytest.mark.gpu
def test_cuda_layer_matches_cpu_and_runs_under_fp16_autocast():
    """The uniforms come from the private CPU generator, so a CUDA layer draws the same rows."""
    x, gy = _data()
    cpu_layer, _ = _layer(seed=4)
    cuda_layer, _ = _layer(seed=4)
    cuda_layer.cuda()
    gw_cpu = _grads(cpu_layer, x, gy)[0]
    gw_cuda = _grads(cuda_layer, x.cuda(), gy.cuda())[0]
    assert torch.allclose(gw_cuda.cpu(), gw_cpu, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.float16):
        gw, gx, _ = _grads(cuda_layer, x.cuda(), gy.cuda())
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()
