"""A frozen quantized base (``model.quantize``): the base's Linear layers held in 4 or 8 bits by
bitsandbytes, trained through LoRA adapters or a ``model.trainable`` subset of its other parameters.

* 4 bits: ``Linear4bit`` (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, §3): each block of 64 weights
  is stored as 4-bit codes of a data type (NF4, the quantiles of N(0, 1), or FP4) and one absmax
  constant, ``W ≈ absmax_b · q_nf4[c]``; with ``double_quant`` the absmax constants are themselves
  quantized to 8 bits in blocks of 256 (§3, "Double Quantization": 0.127 bits per parameter saved).
  The forward dequantizes to ``bnb_4bit_compute_dtype`` (``model.dtype``) and multiplies.
* 8 bits: ``Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022, arXiv 2208.07339): row-wise absmax int8
  weights, ``W ≈ s_row / 127 · W_int8``, the activations' outlier columns (|x| > 6) in 16 bits.

Loading goes through the libraries made for it: transformers' ``BitsAndBytesConfig`` at
``from_pretrained`` (its bitsandbytes integration swaps the Linear layers and quantizes each weight as
it is read; ``lm_head`` stays in ``model.dtype``), then peft's ``prepare_model_for_kbit_training``
(the base frozen; its remaining 16-bit parameters, norms and embeddings, upcast to fp32 for stability,
as QLoRA does). A model built from ``model.config`` or dequantized from a GGUF file is saved to a
temporary directory and loaded from it the same way, so every source takes one path.

A quantized weight cannot be trained (its storage is integer codes; bitsandbytes' layers have no
weight gradient): ``model.trainable`` naming one is refused, and so is a recipe with neither
``model.lora`` nor ``model.trainable`` (full-parameter training of int8 weights is ``model.dtype: int8``).
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the recipe, a layer above, embeds this section; only its type is needed here
    from lowmem.recipe import QuantizeSection


def bnb_config(quantize: QuantizeSection, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantize``."""
    try:
        import bitsandbytes  # noqa: F401  (transformers' message would name only the missing package)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ValueError("model.quantize: needs the bitsandbytes package (pip install 'lowmem[quant]')") from exc
    if quantize.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize.type,
                              bnb_4bit_use_double_quant=quantize.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)


def load_device() -> torch.device:
    """Where bitsandbytes quantizes the weights: this process's GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_quantized(source: str, quantize: QuantizeSection, dtype: torch.dtype):
    """``from_pretrained(source)`` with the base's Linear layers quantized, prepared for adapter training."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=bnb_config(quantize, dtype),
                                                 device_map={"": load_device()})
    for module in model.modules():
        # bitsandbytes 0.50 on an AVX512-bf16 CPU repacks a Linear4bit's codes, in place, at its first
        # no-grad eval-mode forward; a training forward on the repacked codes then runs gemv_4bit, which has
        # no autograd: every gradient upstream of it is silently zero (measured: LoRA grad norm 0.0 after
        # the trainer's first evaluation). The layer keeps its training format.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    # lowmem enables (non-reentrant) checkpointing itself, after: peft's would be the reentrant kind
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantize_model(build, quantize: QuantizeSection, dtype: torch.dtype):
    """The model ``build()`` makes in memory (config-built, or de-quantized from GGUF), quantized the same way:
    written to a temporary directory, dropped, and loaded back through :func:`load_quantized`. Taking the
    builder, not the model, lets the 16-bit model go before the quantized one is loaded: a caller holding it
    would keep both (measured on a 127M-parameter NF4 config: the build's anonymous peak 0.87 GiB, now 0.72;
    its VmHWM 1.12, now 0.88 GiB, with about 0.25 GiB of checkpoint pages mapped while they are read)."""
    from safetensors.torch import save_model

    model = build()
    name = model.config.name_or_path
    with tempfile.TemporaryDirectory(prefix="lowmem-quantize-") as tmp:
        # not save_pretrained: under a launcher transformers writes only on rank 0, and every process loads
        model.config.save_pretrained(tmp)
        save_model(model, f"{tmp}/model.safetensors")  # tied weights written once, tied again on load
        del model
        quantized = load_quantized(tmp, quantize, dtype)
    quantized.config.name_or_path = name  # the source, not the deleted directory (peft's saved adapter names it)
    return quantized


def quantized_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters held as integer codes (bitsandbytes' ``Params4bit`` / ``Int8Params``)."""
    return {n for n, p in model.named_parameters() if not p.is_floating_point()}
