"""Shared set-up of the first-order offload tests: in-memory layer-wise training (the truth) and the engine."""

from __future__ import annotations

import torch

from lowmem.offload.firstorder import FirstOrderEngine
from lowmem.optim import create_optimizer
from lowmem.steps.layerwise import LayerwiseOptimizer

# small enough that every 2-D block weight of the tiny model is 8-bit in AdamW8bit
OPTIMS = {"adamw": dict(lr=1e-2, weight_decay=0.1),
          "apollo_mini": dict(lr=1e-2, weight_decay=0.1, update_proj_gap=2),
          "adamw8bit": dict(lr=1e-2, weight_decay=0.1, min_8bit_size=256, blocksize=256)}


def optimizer(model, name: str):
    return create_optimizer(model, name, **OPTIMS[name])


def reference(tiny_model, name: str, **model_kw):
    model = tiny_model(**model_kw).train()
    return model, LayerwiseOptimizer(optimizer(model, name))


def ref_step(model, opt, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def engine(tiny_model, name: str, config: dict | None = None, **model_kw):
    model = tiny_model(**model_kw).train()
    return model, FirstOrderEngine(model, optimizer(model, name), config or {}, device="cpu")


def eng_step(eng: FirstOrderEngine, batch) -> torch.Tensor:
    loss, nonfinite = eng.step(lambda: eng.model(**batch).loss)
    assert not nonfinite
    return loss


def state_of(opt) -> dict:
    sd = opt.state_dict()["state"]
    return {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for i, s in sd.items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), f"param {i}: state keys {sorted(a[i])} != {sorted(b[i])}"
        for k, v in a[i].items():
            w = b[i][k]
            same = torch.equal(v.cpu(), w.cpu()) if isinstance(v, torch.Tensor) else v == w
            assert same, f"param {i}: state {k!r} differs"
