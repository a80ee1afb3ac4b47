"""Layer-wise mode: same parameters as normal mode (accumulation 1 and 2, with an LR schedule, tied
embeddings with row gradients), lower peak of live gradient bytes, refusals, state_dict through
the wrapper."""

import copy

import pytest
import torch

from lowmem import create_optimizer
from lowmem.steps.layerwise import LayerwiseOptimizer

OPTIMIZERS = [("adamw", {}), ("galore_adamw", dict(rank=4, update_proj_gap=2)),
              ("apollo", dict(rank=4, update_proj_gap=2)), ("apollo_mini", {}),
              ("frugal", dict(density=0.25, update_proj_gap=2, proj_type="block", block_order="random")),
              ("sgd_sai", {}), ("swan", {}), ("sinkgd", {})]


class GradMeter:
    """Peak bytes of live ``.grad`` tensors, sampled each time the inner optimizer steps."""

    def __init__(self, model, optimizer):
        self.peak = 0
        self.params = list(model.parameters())
        optimizer.register_step_pre_hook(self._sample)

    def _sample(self, *_):
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.peak = max(self.peak, live)


def _train(model, optimizer, scheduler, batches, accum):
    for i in range(0, len(batches), accum):
        for batch in batches[i:i + accum]:
            (model(**batch).loss / accum).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _pair(tiny_model, name, hparams, accum):
    model = tiny_model(tied=True)
    lw_model = copy.deepcopy(model)
    opt = create_optimizer(model, name, lr=1e-2, **hparams)
    inner = create_optimizer(lw_model, name, lr=1e-2, **hparams)
    lw = LayerwiseOptimizer(inner, grad_accum_steps=accum, model=lw_model)  # tied: row gradients
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt, lw)]
    return (model, opt, schedules[0]), (lw_model, lw, schedules[1]), inner


@pytest.mark.parametrize("name,hparams", OPTIMIZERS)
@pytest.mark.parametrize("accum", [1, 2])
def test_same_parameters_as_normal_mode(tiny_model, tiny_batch, name, hparams, accum):
    normal, layerwise, inner = _pair(tiny_model, name, hparams, accum)
    normal_meter, lw_meter = GradMeter(normal[0], normal[1]), GradMeter(layerwise[0], inner)
    batches = [tiny_batch(seed=s) for s in range(4 * accum)]
    _train(*normal, batches, accum)
    _train(*layerwise, batches, accum)
    for (n, a), b in zip(normal[0].named_parameters(), layerwise[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    assert layerwise[1].param_groups[0]["lr"] == normal[1].param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    total = sum(p.numel() * p.element_size() for p in normal[0].parameters())
    assert normal_meter.peak == total
    if accum == 1:  # at most the largest param's gradient plus one in flight
        largest = max(p.numel() * p.element_size() for p in layerwise[0].parameters())
        assert lw_meter.peak <= 2 * largest < total / 2


def test_lr_scheduler_on_wrapper_drives_the_hooks(tiny_model, tiny_batch):
    model = tiny_model()
    lw = LayerwiseOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    sched = torch.optim.lr_scheduler.LambdaLR(lw, lambda s: 0.0 if s >= 1 else 1.0)
    _train(model, lw, sched, [tiny_batch()], 1)
    frozen = [p.detach().clone() for p in model.parameters()]
    _train(model, lw, sched, [tiny_batch(seed=1)], 1)  # lr is now 0: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_through_the_wrapper(tiny_model, tiny_batch):
    model = tiny_model()
    lw = LayerwiseOptimizer(create_optimizer(model, "galore_adamw", lr=1e-3, rank=4))
    sched = torch.optim.lr_scheduler.LambdaLR(lw, lambda s: 1.0)
    _train(model, lw, sched, [tiny_batch()], 1)
    sd = lw.state_dict()
    fresh = LayerwiseOptimizer(create_optimizer(model, "galore_adamw", lr=1e-3, rank=4))
    fresh.load_state_dict(sd)
    assert fresh.param_groups is fresh.optimizer.param_groups and fresh.state is fresh.optimizer.state
    assert len(fresh.state) == len(list(model.parameters()))


def test_refusals_are_one_line_value_errors(tiny_model):
    model = tiny_model()
    opt = create_optimizer(model, "adamw", lr=1e-3)
    with pytest.raises(ValueError, match="optim.layerwise: gradient clipping"):
        LayerwiseOptimizer(opt, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="optim.layerwise: grad_accum_steps"):
        LayerwiseOptimizer(opt, grad_accum_steps=0)


def test_remove_restores_normal_backward(tiny_model, tiny_batch):
    model = tiny_model()
    lw = LayerwiseOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    lw.remove()
    before = [p.detach().clone() for p in model.parameters()]
    model(**tiny_batch()).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("bad", ["all nan", "one nan", "one inf", "one -inf"])
def test_nonfinite_gradient_is_dropped_and_reported(tiny_model, tiny_batch, bad):
    """A gradient with a NaN or an infinity (all of it, or one element) never reaches the optimizer:
    that weight and its state stay as they were, the other weights are updated, and
    take_nonfinite() reports the step once."""
    def poison(g):
        if bad == "all nan":
            return torch.full_like(g, float("nan"))
        g = g.clone()
        g.view(-1)[7] = {"one nan": float("nan"), "one inf": float("inf"), "one -inf": float("-inf")}[bad]
        return g

    model = tiny_model()
    opt = LayerwiseOptimizer(create_optimizer(model, "adamw", lr=1e-2))
    poisoned = model.model.layers[0].mlp.down_proj.weight
    other = model.model.layers[1].mlp.down_proj.weight
    before, other_before = poisoned.detach().clone(), other.detach().clone()
    handle = poisoned.register_hook(poison)
    model(**tiny_batch()).loss.backward()
    handle.remove()
    assert opt.take_nonfinite() and not opt.take_nonfinite()
    opt.step()
    assert torch.equal(poisoned, before) and not opt.state[poisoned]
    assert not torch.equal(other, other_before) and torch.isfinite(other).all()
