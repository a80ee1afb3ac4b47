"""Saving a LoRA run's adapter with the other parameters it trained (``model.lora`` with ``model.trainable``).

peft's ``save_pretrained`` writes only what peft itself made trainable: the ``lora_A`` / ``lora_B``
matrices and the modules a ``LoraConfig`` names in ``modules_to_save``. lowmem trains its
``model.trainable`` globs (e.g. ``*norm*``) on the plain parameters instead (their names, weight tying and
memory stay those of the model), so peft's file alone would drop them and ``PeftModel.from_pretrained``
would load the untrained norms.

The saved adapter therefore declares every module that owns a trained non-adapter parameter in
``modules_to_save``, peft's format for fully trained modules: ``adapter_config.json`` lists the module
paths, and ``adapter_model.safetensors`` holds each module's whole ``state_dict`` under
``base_model.model.<path>.<key>`` (what peft's ``ModulesToSaveWrapper.adapter_state_dict`` writes).
``PeftModel.from_pretrained(base, directory)`` then wraps those modules and loads the trained values into
them, so it rebuilds the model that was trained. A module sharing a trained parameter (tied embeddings:
``lm_head`` with ``embed_tokens``) is listed too, since peft's wrapper copies each module on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."  # a PeftModel's path to the wrapped transformers model
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def modules_to_save(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules (by their name in the peft model) owning a trained parameter that is not a LoRA adapter
    matrix, tied owners included."""
    trained = {id(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    return {name: module for name, module in model.named_modules(remove_duplicate=False)
            if any(id(p) in trained for p in module.parameters(recurse=False))}


def add_modules_to_save(model: torch.nn.Module, directory: Path) -> None:
    """Add the trained non-adapter modules of ``model`` (a PeftModel) to the adapter peft's ``save_pretrained``
    wrote into ``directory``: their names to ``modules_to_save``, their tensors to the weights file."""
    modules = modules_to_save(model)
    if not modules:
        return
    tensors, seen = load_file(directory / WEIGHTS), set()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            value = value.detach().to("cpu").contiguous()
            storage = value.untyped_storage().data_ptr()  # safetensors refuses shared storage: a tied
            tensors[f"{name}.{key}"] = value.clone() if storage in seen else value  # tensor's second owner copies
            seen.add(storage)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    config = json.loads((directory / CONFIG).read_text())
    names = sorted({*(config.get("modules_to_save") or []), *(n.removeprefix(PREFIX) for n in modules)})
    (directory / CONFIG).write_text(json.dumps({**config, "modules_to_save": names}, indent=2, sort_keys=True) + "\n")
