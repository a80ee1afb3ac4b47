"""Shared checks of the stateless matrix optimizers (SWAN, SinkGD) on a tiny Llama."""

from __future__ import annotations

import torch

from _compress_helpers import check_resume, model_trajectory, twin_models
from lowmem.optim.registry import create_optimizer
from lowmem.optim.targets import split_parameters


def rand(*shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    """A seeded standard-normal tensor (fp64 by default)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_reference_trajectory(model, batches, direction, lr: float, lr_scale: float, betas=(0.9, 0.999),
                               eps: float = 1e-8) -> list[torch.Tensor]:
    """Obviously-correct fp64 loop: block Linear weights ``W -= lr*lr_scale*direction(G)``; every other
    parameter HF-style AdamW (bias-corrected step size, eps outside the correction) with fp32 moments
    (lowmem's MomentStore keeps moments in fp32 whatever the parameter dtype), no weight decay."""
    split = split_parameters(model)
    targets = {id(p) for _, p in split.targets}
    moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    losses = []
    for t, batch in enumerate(batches, start=1):
        loss = model(**batch).loss
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                g = p.grad
                if id(p) in targets:
                    p -= lr * lr_scale * direction(g)
                    continue
                g = g.float()
                m, v = moments.setdefault(id(p), (torch.zeros_like(g), torch.zeros_like(g)))
                m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                step = lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t)
                p -= step * (m / (v.sqrt() + eps)).double()
        model.zero_grad()
        losses.append(loss.detach())
    return losses


def check_against_dense_reference(tiny_model, tiny_batch, name: str, direction, tol: float = 1e-12,
                                  **target_keys) -> None:
    """Three fp64 steps through ``create_optimizer(name)`` equal the dense reference (``tol``)."""
    ours_model, ref_model = twin_models(tiny_model, dtype=torch.float64)
    ours = create_optimizer(ours_model, name, lr=2e-3, lr_scale=0.5, **target_keys)
    batches = [tiny_batch(seed=s) for s in range(3)]
    ours_losses = model_trajectory(ours_model, ours, batches)
    ref_losses = dense_reference_trajectory(ref_model, batches, direction, lr=2e-3, lr_scale=0.5)
    torch.testing.assert_close(torch.stack(ours_losses), torch.stack(ref_losses), rtol=tol, atol=0)
    for (n, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=n)
    assert not torch.equal(ours_model.model.layers[0].self_attn.q_proj.weight,
                           twin_models(tiny_model, dtype=torch.float64)[0].model.layers[0].self_attn.q_proj.weight)


def check_routing_and_no_state(tiny_model, tiny_batch, name: str, marker: str) -> None:
    """Block Linear weights are in the stateless group and have no entry in ``optimizer.state``
    after a step; embeddings, norms and ``lm_head`` are on AdamW with moments."""
    model = tiny_model()
    opt = create_optimizer(model, name, lr=1e-3)
    model_trajectory(model, opt, [tiny_batch()])
    names = {id(p): n for n, p in model.named_parameters()}
    stateless = [names[id(p)] for g in opt.param_groups if marker in g for p in g["params"]]
    assert stateless and all(n.startswith("model.layers.") and n.endswith("proj.weight") for n in stateless)
    assert len(stateless) == 2 * 7
    for group in opt.param_groups:
        for p in group["params"]:
            if marker in group:
                assert p not in opt.state
            else:
                assert "exp_avg" in opt.state[p] and "exp_avg_sq" in opt.state[p], names[id(p)]
    adam_names = {names[id(p)] for g in opt.param_groups if marker not in g for p in g["params"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adam_names
    only_q = create_optimizer(model, name, lr=1e-3, target_modules=["*q_proj"])
    assert sum(len(g["params"]) for g in only_q.param_groups if marker in g) == 2


def check_resume_stateless(cls, **target_keys) -> None:
    shapes = [(24, 10), (10, 24), (16, 16), (7,)]

    def build(params):
        return cls([{"params": [p for p in params if p.dim() == 2], **target_keys},
                    {"params": [p for p in params if p.dim() != 2]}], lr=1e-2, weight_decay=0.1)

    check_resume(build, 3, 6, shapes=shapes)
