"""Optimizer state and other run state as safetensors tensors plus JSON (no pickle): the encoding
checkpoints use (:mod:`lowmem.checkpoint`, :mod:`lowmem.fsdp_checkpoint`).

Tuples become ``{"__tuple__": [...]}`` and tensors ``{"__tensor__": key}`` with the tensor stored
under ``key``, so :func:`decode` restores exactly what :func:`encode` took.
"""

from __future__ import annotations

from typing import Any

import torch

_TAGS = ("__tuple__", "__tensor__")  # marks in the JSON form of tuples and tensors



class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message is one line naming the file."""


def encode(value: Any, key: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """JSON-able form of ``value``: tuples become ``{"__tuple__": [...]}``, tensors are moved
    to ``tensors[key]`` and replaced by ``{"__tensor__": key}`` (refused when ``tensors`` is None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        if tensors is None:
            raise CheckpointError(f"{key}: tensors are not supported here")
        if key in tensors:
            raise CheckpointError(f"{key}: two tensors map to the same checkpoint key")
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) and k not in _TAGS for k in value):
        return {k: encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
    raise CheckpointError(f"{key}: cannot store a {type(value).__name__} in a checkpoint "
                          "(only tensors, numbers, strings, None, lists, tuples and str-keyed dicts)")


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(decode(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: decode(v, tensors) for k, v in value.items()}
    return value


def optimizer_state_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors (keys ``state.{idx}.{name}``,
    ``param_groups.{i}.{key}``) and a JSON-able meta that records tuples and key types."""
    tensors: dict[str, torch.Tensor] = {}
    state = [[idx, encode(s, f"state.{idx}", tensors)] for idx, s in state_dict["state"].items()]
    groups = [encode(g, f"param_groups.{i}", tensors) for i, g in enumerate(state_dict["param_groups"])]
    # optimizer-wide entries beside the two standard ones (e.g. a ZO optimizer's "zo" generator state)
    rest = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    return tensors, {"state": state, "param_groups": groups, "extra": encode(rest, "extra", tensors)}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Exact inverse of :func:`optimizer_state_to_tensors`."""
    return {"state": {idx: decode(s, tensors) for idx, s in meta["state"]},
            "param_groups": [decode(g, tensors) for g in meta["param_groups"]],
            **decode(meta["extra"], tensors)}
