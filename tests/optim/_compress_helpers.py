"""Shared helpers of the state-compressing optimizer tests (GaLore, APOLLO, FRUGAL)."""

from __future__ import annotations

import copy
import io
import numbers

import torch

SHAPES = [(24, 10), (10, 24), (16, 16), (7,)]


def make_params(seed: int = 0, dtype=torch.float32, shapes=SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def set_grads(params, step: int) -> None:
    """A gradient that depends on the parameter (so trajectories can diverge) and on the step."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        p.grad = torch.sin(3 * p.detach()) + noise


def run(opt, params, steps: range) -> None:
    for k in steps:
        set_grads(params, k)
        opt.step()
        opt.zero_grad()


def groups_for(params, **target_keys) -> list[dict]:
    """Reference-style groups: 2-D params get the method's keys, the rest plain Adam."""
    return [{"params": [p for p in params if p.dim() == 2], **target_keys},
            {"params": [p for p in params if p.dim() != 2]}]


def assert_plain_state(state_dict: dict) -> None:
    for pid, st in state_dict["state"].items():
        for key, value in st.items():
            assert isinstance(value, (torch.Tensor, numbers.Number)), (pid, key, type(value))


def safe_reload(state_dict: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_resume(build, split: int, total: int, seed: int = 0, shapes=SHAPES) -> None:
    """A state_dict round trip at step ``split`` then continuing equals an uninterrupted run, bit for bit.

    ``build(params)`` returns a fresh optimizer over ``params``.
    """
    ref_params = make_params(seed, shapes=shapes)
    ref = build(ref_params)
    run(ref, ref_params, range(total))

    params = make_params(seed, shapes=shapes)
    first = build(params)
    run(first, params, range(split))
    saved = safe_reload(first.state_dict())
    assert_plain_state(saved)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = build(resumed_params)
    second.load_state_dict(saved)
    run(second, resumed_params, range(split, total))
    for a, b in zip(ref_params, resumed_params):
        assert torch.equal(a, b)


def model_trajectory(model, opt, batches) -> list[torch.Tensor]:
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def twin_models(tiny_model, **kw):
    model = tiny_model(**kw)
    return model, copy.deepcopy(model)


def model_groups(model, **target_keys) -> list[dict]:
    """Reference-style groups on a tiny Llama: block Linear weights get the method's keys."""
    from lowmem.optim.targets import split_parameters

    split = split_parameters(model)
    return [{"params": [p for _, p in split.targets], **target_keys},
            {"params": [p for _, p in split.decay + split.no_decay]}]
