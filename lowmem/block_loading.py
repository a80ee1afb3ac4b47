"""Pretrained weights read tensor by tensor into a streamed model (issue 25; :mod:`lowmem.block_source`).

``from_pretrained`` reads a checkpoint whole before the offload engine can move its blocks out, so a
model larger than the host's RAM cannot start. Here the model is built on ``meta`` from the checkpoint's
``config.json``, and :class:`SafetensorsFiller` gives each module its tensors when asked, each one read
alone (``safetensors.safe_open``: a memory map, one ``get_tensor`` at a time) from the single
``model.safetensors`` or from the shard the index ``model.safetensors.index.json`` names, and cast to the
run's dtype (what ``from_pretrained(..., dtype=)`` does); the units at once, each block when the engine
stores it. A tied weight (``all_tied_weights_keys``, absent from the file) takes its source's tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowmem.block_source import BlockFiller, attach_filler, fill_units, materialise_as

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, from the index or the single file; None when
    ``directory`` holds no safetensors checkpoint."""
    from safetensors import safe_open

    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return {name: directory / shard for name, shard in weight_map.items()}
    if (directory / SINGLE).is_file():
        with safe_open(directory / SINGLE, framework="pt") as f:
            return {name: directory / SINGLE for name in f.keys()}
    return None


class FileFiller(BlockFiller):
    """Fills each parameter still on ``meta`` (a tied alias aside: the tie gives it its value) of the modules
    asked for with :meth:`read` of its name, cast to the run's dtype: one tensor in memory at a time."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__(model, dtype)
        self.tied = set(getattr(model, "all_tied_weights_keys", None) or {})

    def fill_modules(self, modules: list[nn.Module]) -> None:
        for module in modules:
            name = self.names[id(module)]
            for key, p in module.named_parameters(recurse=False):
                full = f"{name}.{key}" if name else key
                if p.is_meta and full not in self.tied:
                    materialise_as(p, self.read(full).to(self.dtype))

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsFiller(FileFiller):
    """Fills a streamed model's modules from a safetensors checkpoint, one tensor at a time."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, files: dict[str, Path], field: str):
        super().__init__(model, dtype)
        self.files, self.field = files, field
        self.prefix = getattr(model, "base_model_prefix", "")

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of the checkpoint (also found without the base model's prefix, as transformers
        loads a base model's checkpoint into a model with a head)."""
        from safetensors import safe_open

        bare = name.removeprefix(f"{self.prefix}.") if self.prefix else name
        key = name if name in self.files else bare
        if key not in self.files:
            raise ValueError(f"{self.field}: the checkpoint has no tensor {name!r}")
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)


def checkpoint_dir(source: str) -> Path | None:
    """``source`` (a directory, or a hub id) as a local directory: a hub id's cached snapshot (None: not cached)."""
    if Path(source).is_dir():
        return Path(source)
    from transformers.utils import cached_file

    config = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False)
    return None if config is None else Path(config).parent


def load_streamed(source: str, dtype: torch.dtype, gguf_file: str | None = None,
                  field: str = "model.path") -> nn.Module | None:
    """The model of the checkpoint at ``source`` (:func:`checkpoint_dir`; its ``gguf_file`` when given, else
    its safetensors) with its units read and its blocks left on ``meta`` (filled one by one by the offload
    engine); None when no such checkpoint is here or its format needs the whole file (read in memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if gguf_file:
        return load_streamed_gguf(source, gguf_file, dtype)
    directory = checkpoint_dir(source)
    files = None if directory is None else checkpoint_files(directory)
    if files is None:
        return None
    config = AutoConfig.from_pretrained(directory)
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    filler = SafetensorsFiller(model, dtype, files, field)
    fill_units(model, filler)
    attach_filler(model, filler)
    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


class GgufFiller(FileFiller):
    """Fills a streamed model's modules from a GGUF file, one tensor at a time: ``gguf.GGUFReader`` maps the
    file; each tensor is de-quantized alone (``gguf.dequantize``), put back in Hugging Face layout by
    transformers' tensor processor of the architecture (Llama: q/k rows un-permuted), and cast to the run's
    dtype, as transformers' ``load_gguf_checkpoint`` does for the whole file at once."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, reader, processor, field: str):
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        super().__init__(model, dtype)
        self.processor, self.field = processor, field
        hf_names = get_gguf_hf_weights_map(model, processor)  # GGUF name -> parameter name
        self.tensors = {hf_names[t.name]: t for t in reader.tensors if t.name in hf_names}

    def read(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        if name not in self.tensors:
            raise ValueError(f"{self.field}: the GGUF file has no tensor for {name!r}")
        t = self.tensors[name]
        weights = self.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name).weights
        return torch.from_numpy(np.copy(weights))


PER_TENSOR = {"TensorProcessor", "LlamaTensorProcessor"}  # transformers' processors that map each tensor alone


def load_streamed_gguf(directory: str, gguf_file: str, dtype: torch.dtype,
                       field: str = "model.gguf_file") -> nn.Module | None:
    """The model of the GGUF file ``directory/gguf_file`` with its units read and its blocks left on ``meta``;
    None for an architecture whose tensors transformers converts together (read in memory)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint,
                                                          read_field)

    path = Path(directory) / gguf_file
    reader = GGUFReader(path)
    processor_class = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)
    if processor_class.__name__ not in PER_TENSOR:
        return None
    # the metadata parsed once, for the tensor processor and the model's config (gguf.GGUFReader parses every
    # field, the tokenizer's vocabulary included: each parse was a third of the streamed load of SmolLM2-135M)
    parsed = load_gguf_checkpoint(path, return_tensors=False)["config"]
    processor = processor_class(config=parsed)
    config = AutoConfig.for_model(**parsed)
    config._name_or_path = str(directory)  # as from_pretrained names it
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    filler = GgufFiller(model, dtype, reader, processor, field)
    fill_units(model, filler)
    attach_filler(model, filler)
    return model.eval()
