"""LoRA adapters and a frozen bitsandbytes base on fake tensors, so the planner traces them (issue 27).

Two library objects resist fake tensors, and each gets the smallest stand-in that keeps its bytes:

* ``nn.Module.to`` swaps every fake parameter (``torch.utils.swap_tensors``), which fails once the fake
  mode holds a weak reference to it; peft moves each new adapter to its base layer's device and dtype
  this way. :func:`fake_friendly_to` replaces the parameters instead (ties inside the moved module kept).
* bitsandbytes' ``Params4bit`` / ``Int8Params`` cannot wrap a fake tensor (a tensor subclass cannot
  re-wrap another). :func:`quantize_base` therefore swaps the Linear layers transformers' bitsandbytes
  integration would swap (its own rule, ``get_keys_to_not_convert``) for modules that hold what
  bitsandbytes holds and call bitsandbytes' own autograd functions, which have fake kernels:

  - 4 bits (QLoRA, arXiv 2305.14314): ``ceil(n / 2)`` bytes of codes and the ``QuantState`` that
    ``bitsandbytes.functional.quantize_4bit`` returns (absmax per 64 weights in fp32, or with double
    quantization in 8 bits plus an fp32 constant per 256 of them); ``MatMul4Bit`` saves only the codes
    and dequantizes again in backward;
  - 8 bits (LLM.int8(), arXiv 2208.07339): the row-wise int8 weight and its fp32 row scales; on the CPU
    ``MatMul8bitFp`` dequantizes the weight per call and saves the layer's input.

Then peft's ``prepare_model_for_kbit_training`` runs as in :func:`lowmem.quantized_base.load_quantized`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily


def _moved(module: nn.Module, device, dtype) -> nn.Module:
    """``module`` with each tensor moved (floating ones cast), parameters replaced rather than swapped."""
    memo: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                new = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
                if new is t:
                    continue
                if isinstance(t, nn.Parameter):
                    new = memo.setdefault(id(t), nn.Parameter(new, requires_grad=t.requires_grad))
                store[key] = new
    return module


@contextlib.contextmanager
def fake_friendly_to():
    """``nn.Module.to`` that works on fake parameters (see the module docstring)."""
    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        return _moved(self, device, dtype)

    with mock.patch.object(nn.Module, "to", to):
        yield


def _init_as(layer: nn.Module, linear: nn.Linear, codes: torch.Tensor) -> nn.Parameter:
    """Set up ``layer`` (a bitsandbytes Linear class, its own ``__init__`` skipped: it makes a tensor
    subclass) as ``linear``'s quantized twin holding ``codes``; return its weight."""
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.weight = nn.Parameter(codes, requires_grad=False)
    layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer.weight


@functools.cache
def _layers() -> dict[int, type]:
    """bits -> a subclass of bitsandbytes' Linear layer (so peft gives it its k-bit LoRA layer) built on fake
    tensors; ``held()`` lists the constants it holds beside its parameters."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes.autograd._functions import MatmulLtState

    class Linear4bit(bnb.nn.Linear4bit):
        def __init__(self, linear: nn.Linear, quantize, compute_dtype: torch.dtype):
            if "dynamic" not in F.name2qmap:  # the 8-bit code book of double quantization: a real constant
                with unset_fake_temporarily():  # (built with .item(), which a fake tensor cannot answer)
                    F.name2qmap["dynamic"] = F.create_dynamic_map()
            codes, quant_state = F.quantize_4bit(linear.weight.detach(), blocksize=64,
                                                 compress_statistics=quantize.double_quant,
                                                 quant_type=quantize.type, quant_storage=torch.uint8)
            weight = _init_as(self, linear, codes)
            weight.quant_state, weight.quant_type = quant_state, quantize.type
            weight.compress_statistics = quantize.double_quant
            self.compute_dtype = compute_dtype

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # Linear4bit.forward, training
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            return bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=bias,
                                   quant_state=self.weight.quant_state).to(x.dtype)

        def held(self) -> list[torch.Tensor]:
            qs = self.weight.quant_state
            return [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])

    class Linear8bitLt(bnb.nn.Linear8bitLt):
        def __init__(self, linear: nn.Linear, quantize, compute_dtype: torch.dtype):
            codes, scales, _ = F.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
            _init_as(self, linear, codes)
            self.state, self.index = MatmulLtState(), None
            self.state.CB, self.state.SCB, self.state.has_fp16_weights = codes, scales, False
            self.state.threshold = 6.0  # transformers' llm_int8_threshold default

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # Linear8bitLt.forward, training
            self.state.is_training = self.training
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return bnb.matmul(x, self.weight, bias=bias, state=self.state)

        def held(self) -> list[torch.Tensor]:
            return [self.state.SCB]

    return {4: Linear4bit, 8: Linear8bitLt}


def quantize_base(model: nn.Module, quantize, compute_dtype: torch.dtype) -> nn.Module:
    """``model`` (fake tensors) with its base quantized as ``model.quantize`` loads it, prepared for adapters."""
    from peft import prepare_model_for_kbit_training
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    layer = _layers()[quantize.bits]
    keep = get_keys_to_not_convert(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and should_convert_module(name, keep):
            model.set_submodule(name, layer(module, quantize, compute_dtype))
    setattr(model, f"is_loaded_in_{quantize.bits}bit", True)  # what peft's preparation and LoRA read
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantization_constants(model: nn.Module) -> list[torch.Tensor]:
    """The tensors the quantized layers hold beside their parameters (absmax, scales, code books)."""
    layers = tuple(_layers().values()) if "bitsandbytes" in sys.modules else ()
    return [t for m in model.modules() if isinstance(m, layers) for t in m.held()]
