"""The shipped ZO2 recipes learn: an update of lr*g*z far below half an ulp of the host dtype is not
rounded away (issue #18). With the recipe's dtypes, lr and eps, one ZO2 step on a small OPT with
OPT-like weights (std 0.02) must move the host copy along the exact fp32 update on average:
stochastic rounding gives E[h1 - h0] = delta per element, so S = sum(sign(delta) (h1 - h0)) has mean
sum|delta| and variance at most sum |delta| ulp. The former recipe (fp16 compute and host copy,
round to nearest) fails this test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowmem.offload.engine import ZO2Engine
from lowmem.optim import create_optimizer
from lowmem.recipe import load_recipe
from tests.offload.helpers import batches

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    h = x.to(dtype)
    return (torch.nextafter(h, torch.full_like(h, float("inf"))).float() - h.float()).abs()


def _int8_step(x: torch.Tensor) -> torch.Tensor:
    """Each element's quantization step in the int8 host copy: absmax / 127 of its block of 256."""
    flat = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % 256)).view(-1, 256)
    return (flat.abs().amax(1, keepdim=True) / 127).expand_as(flat).reshape(-1)[:x.numel()].view(x.shape)


def progress(tiny_model, dtype: torch.dtype, host_dtype: str | None, lr: float, eps: float, hidden: int = 64):
    """(S, its expected value sum|delta|, the bound on its standard deviation) after one step."""
    hp = dict(lr=lr, eps=eps, weight_decay=0.0, seed=3)
    model = tiny_model(arch="opt", layers=2, hidden=hidden, dtype=dtype)
    eng = ZO2Engine(model, create_optimizer(model, "mezo", **hp), dict(host_dtype=host_dtype), device="cpu")
    start = {k: v.float() for k, v in eng.model_state_dict().items()}
    ref = tiny_model(arch="opt", layers=2, hidden=hidden).eval()  # exact fp32 MeZO from the same weights
    ref.load_state_dict(start)
    ref_opt = create_optimizer(ref, "mezo", **hp)
    batch = batches(1, vocab=128)[0]
    ref_opt.step(lambda: ref(**batch).loss)
    eng.step(batch)
    eng.flush()
    after = eng.model_state_dict()
    host = torch.float16 if host_dtype == "float16" else (torch.bfloat16 if host_dtype == "bfloat16" else dtype)
    s = mean = var = 0.0
    for name, w in ref.state_dict().items():
        if ".layers." not in name or w.dim() < 2:
            continue
        delta = (w - start[name]).double()
        moved = (after[name].float() - start[name]).double()
        s += float((delta.sign() * moved).sum())
        mean += float(delta.abs().sum())
        step = _int8_step(start[name]) if host_dtype == "int8" else _ulp(start[name], host)
        var += float((delta.abs() * step.double()).sum())
    return s, mean, var ** 0.5


@pytest.mark.parametrize("name", ["opt-30b-zo2.yaml", "llama3-8b-zo2.yaml"])
def test_shipped_recipe_updates_are_not_rounded_away(tiny_model, name):
    recipe = load_recipe(RECIPES / name)
    dtype = getattr(torch, recipe.model.dtype)
    s, mean, sd = progress(tiny_model, dtype, recipe.offload.host_dtype, recipe.optim.lr, recipe.optim.args["eps"])
    assert mean > 8 * sd, "the test model's update is too small to tell progress from noise"
    assert abs(s - mean) < 5 * sd and s > 0.5 * mean


@pytest.mark.parametrize("name", ["opt-30b-zo2.yaml", "llama3-8b-zo2.yaml"])
def test_int8_host_copy_keeps_updates_far_below_a_step(tiny_model, name):
    """offload.host_dtype: int8 with the recipe's lr and eps: updates of ~1e-4 of a quantization step
    still move the int8 copy along the fp32 update on average (stochastic rounding, issue #27). An int8
    step is coarser than a bf16 ulp, so the noise is larger: a wider model gives the signal room."""
    recipe = load_recipe(RECIPES / name)
    s, mean, sd = progress(tiny_model, getattr(torch, recipe.model.dtype), "int8", recipe.optim.lr,
                           recipe.optim.args["eps"], hidden=192)
    assert mean > 8 * sd, "the test model's update is too small to tell progress from noise"
    assert abs(s - mean) < 5 * sd and s > 0.5 * mean


def test_former_fp16_recipe_rounds_its_updates_away(tiny_model):
    s, mean, sd = progress(tiny_model, torch.float16, "float16", 1e-7, 1e-3)
    assert s < 0.2 * mean
