"""Low-bit host copies: stochastic rounding keeps sub-ulp updates (the AMP pitfall of ZO2, Wang et al. 2025,
arXiv 2503.12668, its low-bit transfer format)."""

import pytest
import torch

from lowmem.offload.rounding import round_into, stochastic_round_
from lowmem.optim.zo_noise import gaussian_like, param_seed
from tests.offload.helpers import batches, engine, ref_step, reference


LR = 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_brackets(dtype):
    base = torch.randn(4097).to(dtype)
    ulp = (torch.nextafter(base, torch.full_like(base, float("inf"))).float() - base.float())
    x = base.float() + 0.3 * ulp                    # 0.3 ulp: round-to-nearest gives ``base`` back
    assert torch.equal(x.to(dtype), base)
    draws = torch.stack([_sr(x, dtype, seed) for seed in range(400)]).float()
    assert ((draws == base.float()) | (draws == base.float() + ulp)).all()   # only the two neighbours
    mean_shift = ((draws.mean(0) - base.float()) / ulp).mean()
    assert abs(mean_shift - 0.3) < 0.01                                        # E[SR(x)] = x
    exact = base.float()
    assert torch.equal(_sr(exact, dtype, 0), base)                             # representable: unchanged


def _sr(x, dtype, seed):
    out = torch.empty(x.shape, dtype=dtype)
    stochastic_round_(out, x, seed)
    return out


def test_same_dtype_is_a_plain_copy():
    x = torch.randn(100)
    out = torch.empty(100)
    round_into(out, x, seed=0)
    assert torch.equal(out, x)


def test_bf16_host_keeps_sub_ulp_updates(tiny_model):
    """fp32 compute, bf16 host copies; updates of ~2e-6, a few % of a bf16 ulp for most weights.
    Round-to-nearest write-back (simulated with MeZO's own z and g) loses most of the displacement;
    the engine's stochastic rounding keeps all of it in expectation (it adds zero-mean noise)."""
    data = batches(1) * 60
    hp = dict(lr=LR, weight_decay=0.0)
    ref, ref_opt = reference(tiny_model, hp, arch="llama", layers=2)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    _, eng = engine(tiny_model, dict(host_dtype="bfloat16"), hp, arch="llama", layers=2)
    nearest = {k: v.to(torch.bfloat16) for k, v in start.items()}  # what round-to-nearest would keep
    for batch in data:
        ref_step(ref, ref_opt, batch)
        eng.step(batch)
        g, seed = ref_opt.last_projected_grads[0], ref_opt.last_step_seed
        for idx, p, group in ref_opt.indexed_params():
            name = next(n for n, q in ref.named_parameters() if q is p)
            if ".layers." in name:
                step = gaussian_like(p, param_seed(seed, 0, idx)) * (g * group["lr"])
                nearest[name] = (nearest[name].float() - step).to(torch.bfloat16)
    eng.flush()
    got, want = eng.model_state_dict(), ref.state_dict()
    blocks = [k for k in want if ".layers." in k and k.endswith("proj.weight")]
    d_got = torch.cat([(got[k] - start[k].to(torch.bfloat16).float()).flatten() for k in blocks])
    d_want = torch.cat([(want[k] - start[k]).flatten() for k in blocks])
    d_nearest = torch.cat([(nearest[k].float() - start[k].to(torch.bfloat16).float()).flatten() for k in blocks])
    # share of the fp32 displacement kept: <d, d_fp32> / |d_fp32|^2 (1 in expectation for an unbiased rounding)
    kept = float(d_got @ d_want / (d_want @ d_want))
    kept_nearest = float(d_nearest @ d_want / (d_want @ d_want))
    assert kept_nearest < 0.5, f"updates not small enough to show the effect ({kept_nearest:.2f} kept by RN)"
    assert 0.85 < kept < 1.15, f"bf16 host copy keeps {kept:.2f} of the fp32 updates"
