"""Saving the fine-tuned model: ``save_pretrained``'s files, written atomically, from memory or streamed.

In memory, ``transformers``' ``save_pretrained`` writes the model (:func:`lowmem.models.save_pretrained`).
A model whose decoder blocks live in the offload tiers (host RAM or NVMe, :mod:`lowmem.offload`) is
written block by block instead (:func:`save_streamed`): the same ``config.json``,
``generation_config.json`` and tokenizer, and the same tensors under the same names and dtypes as
``save_pretrained`` -- tied weights once, by ``transformers``' own rule
(``remove_tied_weights_from_state_dict``), ``_keys_to_ignore_on_save`` left out -- as one safetensors
shard per block and per run of modules outside the blocks, with ``model.safetensors.index.json``
(:func:`lowmem.safetensors_stream.write_sharded`), so host memory holds one block at a time.
``AutoModelForCausalLM.from_pretrained`` loads either.

Both are atomic (:func:`save_atomically`): the files go into a temp directory beside the target, which
is renamed over it once complete; a kill leaves the previous model (or none), never half of one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from lowmem.safetensors_stream import Part, write_sharded


def saved_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (names of ``model.state_dict()``, real tensors) with the entries ``save_pretrained``
    drops: ``_keys_to_ignore_on_save`` and the aliases of tied weights (transformers' own rule)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {n: t for n, t in state.items() if n not in set(getattr(model, "_keys_to_ignore_on_save", None) or ())}
    return remove_tied_weights_from_state_dict(state, model)


def write_config(model, directory: Path, dtype: torch.dtype) -> None:
    """``config.json`` (with ``dtype`` and ``architectures`` as ``save_pretrained`` sets them) and the
    generation config of a model that generates."""
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def save_streamed(model, tokenizer, directory: Path, parts: list[Part]) -> None:
    """``save_pretrained``'s files from ``parts`` (each read when written)."""
    write_config(model, directory, model.dtype)  # the first floating parameter's, as save_pretrained's
    write_sharded(directory, parts, total_parameters=sum(part.numel for part in parts))
    tokenizer.save_pretrained(directory)


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model's safetensors files (one file or shards), by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temp directory beside ``directory``, then rename it over ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".tmp-old-{directory.name}-{os.getpid()}")
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)
