"""Trainable int8 weights (``model.dtype: int8``): Q-GaLore's low-precision weights (Zhang et al. 2024,
arXiv 2407.08296, §3.3, Alg. 1) for full-parameter first-order training with any lowmem optimizer.

1. Storage: every ``nn.Linear`` inside the decoder blocks becomes an :class:`Int8Linear` holding its weight
   as a blockwise int8 payload and one fp32 scale per 256 weights (:mod:`lowmem.kernels.int8_weights`,
   1.016 bytes per weight). Its ``weight`` Parameter keeps the shape and dtype (fp32) that optimizers,
   autograd and ``clip_grad_norm_`` see, but between uses holds one element (a stride-0 view).
2. Forward and backward (:class:`Int8LinearFunction`): the weight is dequantized into the compute dtype
   (autocast's under ``train.mixed_precision``, else the input's: fp32) for the product and freed; backward
   dequantizes it again for ``grad_input``; ``grad_weight = g^T x`` is the dense gradient every optimizer
   reads (one layer's dequantized weight exists at a time).
3. Update (:class:`Int8Updates`, hooks on the optimizer's ``step``): each int8 parameter is stepped alone
   (:func:`lowmem.optim.step_one.step_one`, as layer-wise updates do): its weight is dequantized to fp32,
   the optimizer applies its fp32 update as to any weight, and the result is requantized with stochastic
   rounding, ``W_{t+1} = SR(W_t + Δ_t)`` (Alg. 1, "stochastic rounding"), new scales included. The random
   numbers come from a private generator (seed ``train.seed``, the same on every process so data-parallel
   replicas round alike), saved in checkpoints. One layer's fp32 weight exists at a time during the step.
4. Checkpoints hold payloads and scales by name (``<layer>.weight_q``, ``.weight_scale``): resume is exact;
   ``save_pretrained`` writes the dequantized fp32 weights (a plain model, loadable anywhere).

Why not torchao's ``Int8QuantizedTrainingLinearWeight``: it is a tensor subclass whose every in-place op
(``mul_`` for weight decay, then ``add_``) dequantizes, applies and stochastically rounds again, so one step
rounds several times, and lowmem's fused 8-bit AdamW kernel writes the weight through its data pointer,
which a subclass cannot serve; optimizer state made with ``zeros_like`` would be subclass tensors too.
Dequantizing around the whole update keeps every optimizer's math unchanged and rounds once per step.
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem.kernels.int8_weights import dequantize_int8, num_blocks, quantize_int8_
from lowmem.optim.step_one import step_one
from lowmem.structure import block_container

BLOCKSIZE = 256  # Q-GaLore's group size


def _placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` holding one element (stride 0): the weight's shape without its bytes."""
    return torch.zeros(1, dtype=dtype, device=device).expand(shape)


class Int8LinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized from ``layer`` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x)
        ctx.layer, ctx.has_bias = layer, bias is not None
        with torch.autocast(x.device.type, enabled=False):
            w = layer.dequantized(dtype)                                        # (out, in)
            return nn.functional.linear(x, w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g = g.to(x.dtype)
        grad_x = g @ ctx.layer.dequantized(x.dtype) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])                                         # (tokens, out)
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is a blockwise int8 payload with fp32 scales (see the module docstring).
    A subclass, so the optimizer target rule (Linear layers in the blocks) still finds it."""

    def __init__(self, linear: nn.Linear, blocksize: int = BLOCKSIZE):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight
        w = linear.weight.detach()
        self.in_features, self.out_features, self.blocksize = linear.in_features, linear.out_features, blocksize
        self.register_buffer("weight_q", torch.empty(w.shape, dtype=torch.int8, device=w.device))
        self.register_buffer("weight_scale", torch.empty(num_blocks(w.numel(), blocksize), device=w.device))
        quantize_int8_(self.weight_q, self.weight_scale, w, blocksize)      # round to nearest, once
        self.weight = nn.Parameter(_placeholder(w.shape, torch.float32, w.device),
                                   requires_grad=linear.weight.requires_grad)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(),
                                                                  requires_grad=linear.bias.requires_grad)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight_q, self.weight_scale, self.blocksize, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Int8LinearFunction.apply(x, self.weight, self.bias, self)

    # ------------------------------------------------ the update: fp32 weight while the optimizer runs
    def materialize(self) -> None:
        self.weight.data = self.dequantized(torch.float32)

    def requantize(self, generator: torch.Generator) -> None:
        quantize_int8_(self.weight_q, self.weight_scale, self.weight.data, self.blocksize, generator)
        self.weight.data = _placeholder(self.weight.shape, self.weight.dtype, self.weight.device)

    # ------------------------------------------------ device moves and the saved model
    def _apply(self, fn, recurse=True):
        self.weight.data = self.weight.data[:1, :1].reshape(1)                # move one element, not a copy of W
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.expand(self.out_features, self.in_features)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A plain Linear's entries: the dequantized fp32 weight (and the bias)."""
        destination[prefix + "weight"] = self.dequantized(torch.float32)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of {self.blocksize}"


def quantize_block_linears(model: nn.Module, blocksize: int = BLOCKSIZE) -> dict[str, Int8Linear]:
    """Replace every ``nn.Linear`` inside the decoder blocks by an :class:`Int8Linear`; returns them by name."""
    found = block_container(model)
    if found is None:
        raise ValueError("model.dtype: int8 quantizes the Linear layers of the decoder blocks, and this model has "
                         "no block ModuleList")
    prefix, blocks = found
    swapped = {}
    for i, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:  # subclasses (LoRA, bitsandbytes) are not plain weights
                parent_name, _, child = name.rpartition(".")
                layer = Int8Linear(module, blocksize)
                setattr(block.get_submodule(parent_name) if parent_name else block, child, layer)
                swapped[f"{prefix}.{i}.{name}" if prefix else f"{i}.{name}"] = layer
    return swapped


def int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


class Int8Updates:
    """Steps each int8 parameter alone between dequantization and stochastic rounding (see the module docstring).

    Installed as ``step`` pre/post hooks on the optimizer that does the math (inside a layer-wise wrapper: the
    wrapped one), so every way a step reaches it -- ``optimizer.step()``, layer-wise hooks, accelerate's
    wrapper -- goes through the rounding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int):
        self.layers = {id(m.weight): m for m in int8_layers(model).values()}
        device = next(iter(self.layers.values())).weight_q.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._open: list[Int8Linear] = []
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def _before(self, optimizer, args, kwargs) -> None:
        pending = [(gi, p) for gi, g in enumerate(optimizer.param_groups) for p in g["params"]
                   if id(p) in self.layers and p.grad is not None]
        if sum(len(g["params"]) for g in optimizer.param_groups) == 1:  # one parameter: this is its update
            for _, p in pending:
                self.layers[id(p)].materialize()
                self._open.append(self.layers[id(p)])
            return
        for gi, p in pending:  # a whole step: each int8 weight alone (its gradient is freed), then the rest
            step_one(optimizer, gi, p)

    def _after(self, optimizer, args, kwargs) -> None:
        while self._open:
            self._open.pop().requantize(self.generator)


def stored_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """What a checkpoint stores of a model with int8 layers (None without): trainable parameters, with each
    int8 weight as its payload and scales."""
    layers = int8_layers(model)
    if not layers:
        return None
    placeholders = {id(m.weight) for m in layers.values()}
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in placeholders}
    for name, m in layers.items():
        if m.weight.requires_grad:
            weights[f"{name}.weight_q"], weights[f"{name}.weight_scale"] = m.weight_q, m.weight_scale
    return weights


@torch.no_grad()
def load_stored_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`stored_weights`: every stored tensor copied back in place (names and shapes checked)."""
    own = stored_weights(model)
    for name in sorted(set(own) ^ set(tensors)):
        side = "missing from the checkpoint" if name in own else "not a trainable weight of the model"
        raise ValueError(f"checkpoint: {name!r} is {side}")
    for name, t in own.items():
        if t.shape != tensors[name].shape or t.dtype != tensors[name].dtype:
            raise ValueError(f"checkpoint: {name!r} is {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                             f"the model's {tuple(t.shape)} {t.dtype}")
        t.copy_(tensors[name])
