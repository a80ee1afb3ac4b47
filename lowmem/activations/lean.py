"""Memory-lean RMSNorm and gated MLP: save the inputs, recompute the element-wise rest in backward.

The forward is the module's own, bit for bit; only what autograd keeps for backward changes.
Per token row (hidden size d, MLP width f), in the model's dtype:

RMSNorm (Llama, Qwen, Mistral; Zhang & Sennrich 2019), computed in fp32 as Hugging Face does::

    r = 1 / sqrt(mean(x²) + ε),  x̂ = x·r,  y = w ⊙ x̂
    autograd keeps x (as fp32), x̂ and r              ->  lean keeps x and r (fp32, one per row)
    ∂w = Σ_rows ∂y ⊙ x̂ ;  ∂x̂ = ∂y ⊙ w ;  ∂x = r·(∂x̂ − x̂·mean(∂x̂ ⊙ x̂))

Gated MLP (SwiGLU and its GeGLU kin; Shazeer 2020), y = W_d (act(W_g x) ⊙ W_u x)::

    g = W_g x,  u = W_u x,  a = act(g),  h = a ⊙ u
    autograd keeps x, g, a, u and h: d + 4f            ->  lean keeps x, g and u: d + 2f
    ∂h = ∂y W_d ;  ∂W_d = ∂yᵀ h ;  ∂g = act'(g) ⊙ ∂h ⊙ u ;  ∂u = ∂h ⊙ a
    ∂x = ∂g W_g + ∂u W_u ;  ∂W_g = ∂gᵀ x ;  ∂W_u = ∂uᵀ x

(a and h are recomputed from g and u; ``act'`` is the activation's own autograd backward.)
With WTA-CRS on both ``gate_proj`` and ``up_proj`` (:mod:`lowmem.activations.swap`), x is kept
only at one WTA-CRS row sample shared by ∂W_g and ∂W_u, p ∝ ||x_i||, or ||x_i||·ĝ_i with ĝ a
running estimate of sqrt(||∂g_i||² + ||∂u_i||²) (``grad_norm_momentum``): d·k/N + 2f per row,
unbiased as in :mod:`lowmem.activations.sampler`. ∂W_d stays exact: its input h is recomputed
from g and u anyway, so sampling it would save no memory; and with only one of gate/up under
WTA-CRS, ∂W_g and ∂W_u are exact too (x is kept whole). ∂x is always exact.

The same idea as Liger-Kernel's RMSNorm and SwiGLU (which keep x, r and g, u), and as the
WTA-CRS reference, which replaces T5's LayerNorm by one that keeps a single tensor.

A module is replaced only if it passes a probe: in training mode, its own forward and the lean
forward give the same dtype and bit-identical values on a random input, with random stand-ins of
a few elements for its parameters, for every weight/input dtype pairing a run can produce (fp32,
bf16, fp16; fp32 weights with low-precision inputs for norms). So a variant such as Gemma's
``1 + w`` norm, or Olmo-2's ``(w ⊙ x̂)`` cast after the product, is left alone. Projections
wrapped later (LoRA) make the MLP fall back to its own forward. The swap changes the module's class in place (like
:mod:`lowmem.activations.swap`), so parameters, hooks and ``state_dict`` keys are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from lowmem.activations.linear import SAMPLED_CLASS, autocast_inputs, batch_seq, draw_rows
from lowmem.activations.sampler import row_norms

# exactly these (plain, or swapped to WTA-CRS): subclasses such as 8-bit or LoRA layers hold other weights
_LINEAR_CLASSES = (nn.Linear, SAMPLED_CLASS[nn.Linear])
_PROBE_SEED = 1234


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r): Hugging Face's Llama RMSNorm forward, op for op, and r = rsqrt(mean(x²) + ε) (fp32)."""
    r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x.float() * r).to(x.dtype), r


class RMSNormFunction(torch.autograd.Function):
    """y = w ⊙ (x·r) keeping x and r for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, r, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, r, weight = ctx.saved_tensors
        x_hat = x.float() * r  # fp32
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_hat = (grad_y * weight).float()
            grad_x = (r * (grad_hat - x_hat * (grad_hat * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


@dataclass
class _MLPWeights:
    """The three projections of a gated MLP, cast for the forward (biases may be None)."""

    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _gated_mlp(x: torch.Tensor, w: _MLPWeights, act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, g, u): Hugging Face's ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, op for op."""
    g, u = F.linear(x, w.gate, w.gate_bias), F.linear(x, w.up, w.up_bias)
    return F.linear(act(g) * u, w.down, w.down_bias), g, u


class GatedMLPFunction(torch.autograd.Function):
    """y = W_d (act(W_g x) ⊙ W_u x) keeping x (all rows, or the rows ``index``; none when no
    gate/up weight gradient is needed), g and u. Runs under the caller's autocast, with x and
    the weights already cast (:func:`~lowmem.activations.linear.autocast_inputs`), so ``act``
    sees the same policy as in the module's own forward; backward recomputes it under that policy."""

    @staticmethod
    def forward(ctx, x, gate, gate_bias, up, up_bias, down, down_bias, act, index, row_weight, tracker):
        y, g, u = _gated_mlp(x, _MLPWeights(gate, gate_bias, up, up_bias, down, down_bias), act)
        needs = ctx.needs_input_grad
        x_kept = None if not (needs[1] or needs[3]) else \
            x if index is None else x.reshape(-1, x.shape[-1]).index_select(0, index)
        ctx.save_for_backward(x_kept, g, u, gate, up, down, index, row_weight)
        ctx.act, ctx.tracker, ctx.x_shape, ctx.batch_seq = act, tracker, x.shape, batch_seq(x)
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x_kept, g, u, gate, up, down, index, row_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        width = g.shape[-1]
        gy, g, u = grad_y.reshape(-1, grad_y.shape[-1]), g.reshape(-1, width), u.reshape(-1, width)
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            g_leaf = g.detach().requires_grad_(True)
            a = ctx.act(g_leaf)
        grad_h = gy.mm(down)  # (N, f)
        grad_g, = torch.autograd.grad(a, g_leaf, grad_h * u)
        a = a.detach()  # may share g's storage (an identity activation): no in-place on it
        grad_down = gy.t().mm(a * u) if needs[5] else None  # a ⊙ u = h
        grad_u = grad_h.mul_(a)  # ∂h is not needed any more
        grad_x = grad_g.mm(gate).add_(grad_u.mm(up)).reshape(ctx.x_shape) if needs[0] else None
        grad_biases = [t.sum(0) if needs[i] else None for i, t in ((2, grad_g), (4, grad_u), (6, gy))]  # exact
        if ctx.tracker is not None:
            norms = [row_norms(t) for t in (grad_g, grad_u)]
            ctx.tracker.update(torch.stack(norms, dim=1), *ctx.batch_seq)  # sqrt(||∂g||² + ||∂u||²)
        if index is not None:  # the sampled rows, reweighted: unbiased ∂W_g and ∂W_u
            scale = row_weight.unsqueeze(1)
            grad_g, grad_u = ((t.index_select(0, index).float() * scale).to(t.dtype) for t in (grad_g, grad_u))
        x_rows = None if x_kept is None else x_kept.reshape(-1, x_kept.shape[-1])
        grad_gate = grad_g.t().mm(x_rows) if needs[1] else None
        grad_up = grad_u.t().mm(x_rows) if needs[3] else None
        return (grad_x, grad_gate, grad_biases[0], grad_up, grad_biases[1], grad_down, grad_biases[2],
                None, None, None, None)


def _wta_sampled(layer: nn.Module) -> bool:
    return hasattr(layer, "wta_keep_ratio")


class _LeanModule:
    """What the lean mixins share: a lean module pickles as its original class (the swap is a
    runtime change to how backward keeps activations, not part of the model)."""

    def __reduce_ex__(self, protocol):
        return _unpickle_as, (_ORIGINAL[type(self)], self.__getstate__())


def _unpickle_as(cls: type, state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    return module


class _LeanRMSNorm(_LeanModule):
    """Mixin over an RMSNorm class: the forward through :class:`RMSNormFunction` when autograd records."""

    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)


class _LeanGatedMLP(_LeanModule):
    """Mixin over a gated-MLP class: the forward through :class:`GatedMLPFunction` when autograd
    records and the projections are still plain (or WTA-CRS) linear layers (a LoRA wrapper added
    later gets the module's own forward)."""

    def forward(self, x):
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        params = [t for layer in layers for t in (layer.weight, layer.bias)]
        if not (torch.is_grad_enabled() and all(type(layer) in _LINEAR_CLASSES for layer in layers)
                and (x.requires_grad or any(p is not None and p.requires_grad for p in params))):
            return super().forward(x)
        x_c, *params = autocast_inputs(x, *params)
        gate, up = self.gate_proj, self.up_proj
        sample = None
        if (self.training and _wta_sampled(gate) and _wta_sampled(up)
                and (gate.weight.requires_grad or up.weight.requires_grad)):
            sample = draw_rows(x_c, gate.wta_keep_ratio, gate.wta_context, gate.wta_tracker)
        index, row_weight, tracker = (None, None, None) if sample is None else \
            (sample.index, sample.weight, gate.wta_tracker)
        return GatedMLPFunction.apply(x_c, *params, self.act_fn, index, row_weight, tracker)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _same_on_probe(module: nn.Module, param_shapes: dict, x_shape: tuple[int, ...], lean,
                   dtypes: list[tuple[torch.dtype, torch.dtype]]) -> bool:
    """Whether ``module``'s own forward and ``lean(x, *params)`` give the same dtype and
    bit-identical values, in training mode, for each ``(parameter dtype, input dtype)`` of
    ``dtypes``: random stand-ins of a few elements replace the parameters (``param_shapes`` by
    name; None for an absent bias) and ``x`` has ``x_shape``. Real tensors even under a
    ``FakeTensorMode`` (the planner builds the model on fake tensors)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    modes = {m: m.training for m in module.modules()}
    with unset_fake_temporarily(), torch.no_grad():
        try:
            module.train()
            for param_dtype, x_dtype in dtypes:
                gen = torch.Generator().manual_seed(_PROBE_SEED)
                params = {k: None if shape is None else torch.randn(shape, generator=gen).to(param_dtype)
                          for k, shape in param_shapes.items()}
                x = torch.randn(x_shape, generator=gen).to(x_dtype)
                own = torch.func.functional_call(module, {k: v for k, v in params.items() if v is not None}, (x,))
                mine = lean(x, *params.values())
                if own.dtype != mine.dtype or not torch.equal(own, mine):
                    return False
            return True
        finally:
            for m, training in modes.items():
                m.training = training


def _rms_norm_mixin(module: nn.Module) -> type | None:
    params = dict(module.named_parameters())
    if (not type(module).__name__.endswith("RMSNorm") or set(params) != {"weight"} or params["weight"].dim() != 1
            or not isinstance(getattr(module, "variance_epsilon", None), float)):
        return None
    # every weight/input dtype pairing a run can produce (a bf16 model; fp32 weights under autocast)
    dtypes = [(w, x) for w in _FLOATS for x in _FLOATS if w == x or w == torch.float32]
    same = _same_on_probe(module, {"weight": (8,)}, (3, 8),
                          lambda x, w: _rms_norm(x, w, module.variance_epsilon)[0], dtypes)
    return _LeanRMSNorm if same else None


def _gated_mlp_mixin(module: nn.Module) -> type | None:
    layers = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(layer) in _LINEAR_CLASSES for layer in layers) or not callable(getattr(module, "act_fn", None)):
        return None
    own = {id(p) for layer in layers for p in layer.parameters()}
    if any(id(p) not in own for p in module.parameters()):
        return None
    shapes = {}
    for name, layer, (d_out, d_in) in zip(("gate_proj", "up_proj", "down_proj"), layers, ((6, 4), (6, 4), (4, 6))):
        shapes[f"{name}.weight"] = (d_out, d_in)
        shapes[f"{name}.bias"] = None if layer.bias is None else (d_out,)
    same = _same_on_probe(module, shapes, (3, 4), lambda x, *w: _gated_mlp(x, _MLPWeights(*w), module.act_fn)[0],
                          [(dtype, dtype) for dtype in _FLOATS])
    return _LeanGatedMLP if same else None


_LEAN_CLASSES: dict[tuple[type, type], type] = {}
_ORIGINAL: dict[type, type] = {}  # Lean<cls> -> cls


def _lean_class(cls: type, mixin: type) -> type:
    """``Lean<cls>``: ``mixin``'s forward over ``cls`` (one class per pair, so ``type(m)`` stays stable)."""
    if (cls, mixin) not in _LEAN_CLASSES:
        lean = type(f"Lean{cls.__name__}", (mixin, cls), {"__module__": __name__})
        _LEAN_CLASSES[(cls, mixin)], _ORIGINAL[lean] = lean, cls
    return _LEAN_CLASSES[(cls, mixin)]


def _is_lean(module: nn.Module) -> bool:
    return isinstance(module, _LeanModule)


class LeanHandle:
    """What :func:`apply_lean` returns: the replaced modules by name, and ``remove()``."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules.values():
            if _is_lean(module):  # not already restored by remove_lean
                _restore(module)
        self.modules = {}


def apply_lean(model: nn.Module) -> LeanHandle:
    """Make every RMSNorm and gated MLP of ``model`` that passes its probe memory-lean (see above)."""
    if any(_is_lean(m) for m in model.modules()):
        raise ValueError("activations.lean: already applied to this model; remove it first")
    chosen = {}
    for name, module in model.named_modules():
        mixin = _rms_norm_mixin(module) or _gated_mlp_mixin(module)
        if mixin is not None:
            module.__class__ = _lean_class(type(module), mixin)
            chosen[name] = module
    if not chosen:
        raise ValueError(f"activations.lean: {type(model).__name__} has no RMSNorm or gated MLP (gate_proj, up_proj, "
                         "down_proj) computed the Llama way; set it to false")
    return LeanHandle(chosen)


def _restore(module: nn.Module) -> None:
    module.__class__ = _ORIGINAL[type(module)]


def remove_lean(model: nn.Module) -> int:
    """Restore every lean module of ``model`` to its original class; returns how many."""
    lean = [m for m in model.modules() if _is_lean(m)]
    for module in lean:
        _restore(module)
    return len(lean)
