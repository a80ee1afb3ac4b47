"""Swap WTA-CRS into a Hugging Face decoder and take it out again.

Liu et al. 2023 (WTA-CRS) sample the attention output and feed-forward projections and keep
the q/k/v projections exact: their shared input is kept by attention anyway (the main experiments
of arXiv 2305.15265: the "level 2" setting of ``zirui-ray-liu/WTACRS``'s ``level_setup.sh``).
The default target rule says the same without naming one architecture:

    every layer whose class is exactly ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2),
    inside the transformer blocks (``lowmem.structure.block_container``),
    except the attention input projections: names matching ``DEFAULT_EXCLUDE``.

That gives Llama/Qwen/Mistral ``o_proj, gate_proj, up_proj, down_proj``; OPT ``out_proj, fc1, fc2``;
GPT-2 ``attn.c_proj, mlp.c_fc, mlp.c_proj`` (``c_attn``, the fused q/k/v, stays exact).
Subclasses of ``nn.Linear`` (quantized or LoRA layers) are never swapped. ``targets`` replaces the
rule with glob patterns on module names (anywhere in the model).

The swap changes each module's class in place, so the module objects, parameters, hooks and
``state_dict`` keys are untouched and ``remove`` restores the model exactly.
"""

from __future__ import annotations

import fnmatch
import weakref

import torch
from torch import nn

from lowmem.activations.linear import CHECKPOINTING_ERROR, SAMPLED_CLASS, SamplingContext
from lowmem.activations.sampler import GradNormTracker
from lowmem.structure import block_container

DEFAULT_EXCLUDE = ("*q_proj", "*k_proj", "*v_proj", "*qkv_proj", "*c_attn", "*query_key_value",
                   "*Wqkv", "*.query", "*.key", "*.value")
ORIGINAL_CLASS = {sampled: original for original, sampled in SAMPLED_CLASS.items()}
_ATTRS = ("wta_keep_ratio", "wta_context", "wta_tracker")


def _swappable(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {(f"{prefix}.{n}" if prefix and n else prefix or n): m for n, m in model.named_modules()
            if type(m) in SAMPLED_CLASS}


def select_targets(model: nn.Module, targets: list[str] | None = None) -> dict[str, nn.Module]:
    """The modules to swap, by name: the default rule above, or the ``targets`` glob patterns."""
    if targets:
        chosen = {n: m for n, m in _swappable(model).items() if any(fnmatch.fnmatchcase(n, p) for p in targets)}
        if not chosen:
            raise ValueError(f"activations.wta_crs.targets: no nn.Linear or Conv1D module matches {targets}")
        return chosen
    found = block_container(model)
    if found is None:
        raise ValueError("activations.wta_crs.targets: the model has no block ModuleList; give patterns")
    prefix, blocks = found
    inside = _swappable(blocks, prefix)
    return {n: m for n, m in inside.items() if not any(fnmatch.fnmatchcase(n, p) for p in DEFAULT_EXCLUDE)}


class WTACRSHandle:
    """What ``apply_wta_crs`` returns: the private generator the trainer checkpoints, the swapped
    modules, and ``remove()``. ``state_dict()`` also carries the running gradient-norm estimates
    (present only with ``grad_norm_momentum``), which exact resume then needs too."""

    def __init__(self, generator: torch.Generator, modules: dict[str, nn.Module]):
        self.generator = generator
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules.values():
            _restore(module)
        self.modules = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"generator": self.generator.get_state()}
        for name, module in self.modules.items():
            if module.wta_tracker is not None and module.wta_tracker.ema is not None:
                state[f"grad_norm.{name}"] = module.wta_tracker.ema.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        for name, module in self.modules.items():
            ema = state.get(f"grad_norm.{name}")
            if module.wta_tracker is not None:
                module.wta_tracker.ema = None if ema is None else ema.to(module.weight.device).clone()


def _validate(keep_ratio: float, minimal_k: int, grad_norm_momentum: float | None) -> None:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"activations.wta_crs.keep_ratio: must be in (0, 1], got {keep_ratio}")
    if minimal_k < 1:
        raise ValueError(f"activations.wta_crs.minimal_k: must be >= 1, got {minimal_k}")
    if grad_norm_momentum is not None and not 0.0 <= grad_norm_momentum < 1.0:
        raise ValueError(f"activations.wta_crs.grad_norm_momentum: must be in [0, 1) or None, "
                         f"got {grad_norm_momentum}")


def apply_wta_crs(model: nn.Module, keep_ratio: float, targets: list[str] | None = None, seed: int = 0,
                  minimal_k: int = 10, grad_norm_momentum: float | None = None) -> WTACRSHandle:
    """Swap the target layers of ``model`` for WTA-CRS layers keeping ``keep_ratio`` of the rows.

    ``seed`` seeds the one private CPU generator every swapped layer draws from. With
    ``grad_norm_momentum`` (β), p ∝ ||x_i||·ĝ_i uses a per-position running estimate of the output-gradient
    norms (mixed with ||x||, see ``sampler.row_probabilities``); without it p ∝ ||x_i||.
    """
    _validate(keep_ratio, minimal_k, grad_norm_momentum)
    if any(type(m) in ORIGINAL_CLASS for m in model.modules()):
        raise ValueError("activations.wta_crs: already applied to this model; remove it first")
    flags = tuple(weakref.ref(m) for m in model.modules() if hasattr(m, "gradient_checkpointing"))
    if any(ref().gradient_checkpointing for ref in flags):
        raise ValueError(CHECKPOINTING_ERROR)
    modules = select_targets(model, targets)
    if not modules:
        raise ValueError("activations.wta_crs.targets: the default rule found no layer to swap")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    context = SamplingContext(generator=generator, minimal_k=minimal_k, checkpoint_flags=flags)
    for module in modules.values():
        module.wta_keep_ratio = keep_ratio
        module.wta_context = context
        module.wta_tracker = None if grad_norm_momentum is None else GradNormTracker(grad_norm_momentum)
        module.__class__ = SAMPLED_CLASS[type(module)]
    return WTACRSHandle(generator, modules)


def _restore(module: nn.Module) -> None:
    module.__class__ = ORIGINAL_CLASS[type(module)]
    for attr in _ATTRS:
        delattr(module, attr)


def remove_wta_crs(model: nn.Module) -> int:
    """Restore every WTA-CRS layer of ``model`` to its original class; returns how many."""
    swapped = [m for m in model.modules() if type(m) in ORIGINAL_CLASS]
    for module in swapped:
        _restore(module)
    return len(swapped)
