"""Safetensors files written part by part, so that a model larger than RAM is saved one block at a time.

The safetensors format (huggingface/safetensors, "Format"): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`` (padded with spaces to a multiple of 8), then the tensors' bytes, back to back, at those
offsets. The header needs only each tensor's name, shape and dtype, so it is written first from a
*layout* and each tensor's bytes follow straight from its memory (no serialized copy, unlike
``safetensors.torch.save_file``, which builds every tensor's bytes before writing).

A :class:`Part` is tensors that are read together (one offloaded decoder block, one module): its
layout, known without reading it, and ``read()``. :func:`write_file` writes parts into one file
(a checkpoint's ``model.safetensors``); :func:`write_sharded` writes one file per part and the
``model.safetensors.index.json`` that ``transformers``' ``from_pretrained`` follows. Either holds one
part in memory at a time. :class:`LazyTensors` reads a file back tensor by tensor (``safe_open``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
Layout = list[tuple[str, tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Part:
    """Tensors read together: ``layout`` (name, shape, dtype of each, in order) and ``read() -> {name: tensor}``."""

    layout: Layout
    read: Callable[[], dict[str, torch.Tensor]]

    @staticmethod
    def of(tensors: dict[str, torch.Tensor]) -> "Part":
        """A part of tensors already in memory."""
        return Part([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], lambda: tensors)

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for _, shape, _ in self.layout)

    @property
    def nbytes(self) -> int:
        return sum(_numel(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in self.layout)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _header(layout: Layout, metadata: dict[str, str] | None) -> bytes:
    entries, at = {}, 0
    for name, shape, dtype in layout:
        end = at + _numel(shape) * torch.empty((), dtype=dtype).element_size()
        entries[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [at, end]}
        at = end
    if metadata:
        entries["__metadata__"] = metadata
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_tensor(f, name: str, tensor: torch.Tensor, shape, dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise ValueError(f"{name}: read as {tuple(tensor.shape)} {tensor.dtype}, its layout says {tuple(shape)} {dtype}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def write_file(path: Path, parts: list[Part], metadata: dict[str, str] | None = None, durable: bool = False) -> None:
    """One safetensors file of every part's tensors, reading one part at a time."""
    with open(path, "wb") as f:
        f.write(_header([e for part in parts for e in part.layout], metadata))
        for part in parts:
            tensors = part.read()
            for name, shape, dtype in part.layout:
                _write_tensor(f, name, tensors[name], shape, dtype)
            del tensors
        f.flush()
        if durable:
            os.fsync(f.fileno())


def shard_name(i: int, count: int) -> str:
    """``save_pretrained``'s shard names: ``model-00001-of-00003.safetensors``."""
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_sharded(directory: Path, parts: list[Part], total_parameters: int) -> None:
    """One shard per non-empty part and ``model.safetensors.index.json`` (written last), as
    ``save_pretrained`` writes a model bigger than its shard size."""
    parts = [p for p in parts if p.layout]
    weight_map = {}
    for i, part in enumerate(parts):
        name = shard_name(i, len(parts))
        write_file(directory / name, [part], metadata={"format": "pt"})
        weight_map.update({n: name for n, _, _ in part.layout})
    index = {"metadata": {"total_parameters": total_parameters, "total_size": sum(p.nbytes for p in parts)},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class LazyTensors(Mapping):
    """A safetensors file as a read-only mapping; each tensor is read from the file when asked for."""

    def __init__(self, path: Path):
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._names = set(self._keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
