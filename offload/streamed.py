"""The generic part of both offload engines: a model whose decoder blocks live off the device.

ZO2 (Wang et al., 2025, arXiv 2503.12668, §3.1-3.2) and Fuyou (Liao et al., 2024, arXiv
2403.06504, §4) place a model the same way: the decoder blocks' parameters are packed one flat
buffer per block (:class:`~lowmem.offload.transfer.Packed`) and kept in a
:class:`~lowmem.offload.store.BlockStore` (host RAM up to ``offload.host_memory_budget_gb``,
checksummed NVMe files beyond it); a :class:`~lowmem.offload.transfer.BlockMover` uploads them
into a few device slots ahead of use; the modules outside the blocks (embeddings, final norm,
``lm_head``: the *units* of :func:`model_units`) stay on the device. While a block is not resident
its parameters point at empty placeholders, so the model object itself never holds the blocks. A
streamed model (:mod:`lowmem.block_source`: blocks still on ``meta``) has each block filled just before
it is stored, so the whole model is never in host RAM.

:class:`StreamedModel` does that set-up and the model-state I/O (the full state dict read from the
store, loading one into it, handing the blocks back to the model on close); each engine adds its
schedule on top (:mod:`lowmem.offload.engine`: ZO2; :mod:`lowmem.offload.firstorder`: Fuyou).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from lowmem.block_source import block_filler
from lowmem.offload.host_format import host_format
from lowmem.offload.store import BlockStore
from lowmem.offload.transfer import BlockMover, Packed
from lowmem.safetensors_stream import Part
from lowmem.structure import block_container
from lowmem.offload.settings import OffloadSection


def model_units(model: nn.Module) -> tuple[nn.ModuleList, list[tuple[str, nn.Module]]]:
    """The decoder blocks and the top-most parameter-holding modules outside them."""
    found = block_container(model)
    if found is None:
        raise ValueError("model: no nn.ModuleList of decoder blocks found; the offload engines need one")
    prefix, blocks = found
    ancestors = {""} | {prefix.rsplit(".", i)[0] for i in range(1, prefix.count(".") + 1)} | {prefix}
    units = []

    def walk(name: str, module: nn.Module) -> None:
        if name not in ancestors:
            if any(True for _ in module.parameters()):
                units.append((name, module))
            return
        if name != prefix and any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"model: {name or type(module).__name__} holds parameters directly and "
                             f"contains the blocks; the offload engines cannot drive it")
        if name == prefix:
            return
        for child, sub in module.named_children():
            walk(f"{name}.{child}" if name else child, sub)

    walk("", model)
    return blocks, units


def check_blocks(blocks: nn.ModuleList, units: list[tuple[str, nn.Module]]) -> None:
    """What both engines need of the model: no parameter shared across the block boundary, one dtype."""
    in_blocks = {id(p) for p in blocks.parameters()}
    if in_blocks & {id(p) for _, m in units for p in m.parameters()}:
        raise ValueError("model: a parameter is shared between a block and a module outside the blocks")
    if len({p.dtype for p in blocks.parameters()}) != 1:
        raise ValueError("model: the decoder blocks mix parameter dtypes; the offload engines need one")


class StreamedModel:
    """``model`` with its blocks packed in ``pack_dtype`` into a store holding them in ``store_dtype``
    (a float dtype, or ``torch.int8``: blockwise int8 plus scales, :mod:`lowmem.offload.host_format`).

    ``write_back``: whether passes write changed blocks back from the device (ZO2), which takes one
    more device slot (:func:`~lowmem.offload.transfer.slot_count`). ``trained``: per block, whether
    each parameter is rewritten when written back (an int8 copy leaves the others' bytes as stored)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, units: list[tuple[str, nn.Module]],
                 device: torch.device, config: OffloadSection, store_dtype: torch.dtype,
                 pack_dtype: torch.dtype, write_back: bool = True, trained: list[list[bool]] | None = None):
        self.model, self.blocks, self.units, self.device = model, blocks, units, device
        self.compute_dtype, self.pack_dtype = next(blocks.parameters()).dtype, pack_dtype
        self.packed = [Packed.of(b, pack_dtype) for b in blocks]
        self.format = host_format(store_dtype, self.compute_dtype, self.packed, trained)
        budget = None if config.host_memory_budget_gb is None else config.host_memory_budget_gb * 2**30
        self.store = BlockStore([self.format.numel(i) for i in range(len(self.packed))], self.format.store_dtype,
                                budget_bytes=budget, nvme_dir=config.nvme_dir, pin=device.type == "cuda",
                                prefetch_depth=config.prefetch_depth)
        self.mover = BlockMover(self.packed, self.store, device, self.format, config.prefetch_depth,
                                write_back=write_back)
        filler = block_filler(model)  # a streamed model: its blocks get their values here, one at a time
        for i, (block, pk) in enumerate(zip(blocks, self.packed)):  # one block at a time into the store
            if filler is not None:
                filler.fill(block)
            self.store.put(i, self._stored(i, [p.detach() for p in pk.params]))
            self.mover.unbind(i)
            for buf in block.buffers():
                buf.data = buf.data.to(device)
        for _, module in units:
            module.to(device)

    def slots_of(self) -> dict[int, tuple[int, int]]:
        """id(parameter) -> (block, index in the block) for every block parameter."""
        return {id(p): (i, j) for i, pk in enumerate(self.packed) for j, p in enumerate(pk.params)}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state on the CPU; block tensors read from the store, in the packing dtype
        (the training dtype for ZO2, the fp32 masters for the first-order engine)."""
        slots, cache, out = self.slots_of(), {}, {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in slots:
                i, j = slots[id(t)]
                if i not in cache:
                    cache[i] = self.packed[i].views(self._flat(i))
                out[name] = cache[i][j].to(self.pack_dtype, copy=True)
            else:
                out[name] = t.detach().to("cpu", copy=True)
        return out

    def parts(self, dtype: torch.dtype, keep_outside: Callable[[dict], dict],
              keep_block: Callable[[str], bool] = lambda name: True, masters: dict | None = None) -> list[Part]:
        """The model's ``state_dict`` as :class:`~lowmem.safetensors_stream.Part` s, in its order: one per
        block -- its tensors read from the store when written, in ``dtype`` -- and one per run of tensors
        outside the blocks. ``keep_outside(state) -> state`` chooses among the tensors outside the blocks
        (tied aliases dropped there), ``keep_block(name)`` among the blocks'; ``masters``: id(parameter) ->
        the tensor to write for it instead (the first-order engine's fp32 masters of offloaded embeddings).
        Host memory holds one block's tensors at a time."""
        slots = self.slots_of()
        block_of = {id(b): i for i, block in enumerate(self.blocks) for b in block.buffers()}
        block_of.update({key: i for key, (i, _) in slots.items()})
        state = self.model.state_dict(keep_vars=True)
        outside = keep_outside({n: (masters or {}).get(id(t), t).detach() for n, t in state.items()
                                if id(t) not in block_of})
        runs: list[tuple[int | None, list[str]]] = []  # (block or None, names) in state_dict order
        for name, t in state.items():
            key = block_of.get(id(t))
            if name not in outside if key is None else not keep_block(name):
                continue
            if not runs or runs[-1][0] != key:
                runs.append((key, []))
            runs[-1][1].append(name)
        return [self._block_part(i, names, state, dtype) if i is not None else Part.of({n: outside[n] for n in names})
                for i, names in runs]

    def _block_part(self, i: int, names: list[str], state: dict, dtype: torch.dtype) -> Part:
        slots, pk = self.slots_of(), self.packed[i]
        at = {n: slots[id(state[n])][1] for n in names if id(state[n]) in slots}  # a buffer: not in the store
        layout = [(n, tuple(pk.shapes[at[n]]), dtype) if n in at else (n, tuple(state[n].shape), state[n].dtype)
                  for n in names]

        def read() -> dict[str, torch.Tensor]:
            views = pk.views(self._flat(i))
            return {n: views[at[n]].to(dtype) if n in at else state[n].detach() for n in names}
        return Part(layout, read)

    def load_model_state_dict(self, state: Mapping, version: int, partial: bool = False,
                              skip: set[int] = frozenset()) -> None:
        """Load a state (as :meth:`model_state_dict` gives it), block by block into the store: a lazy
        ``state`` (a file read tensor by tensor) is read one block at a time. ``partial``: a name not in
        ``state`` keeps its value (else it is an error); ``skip``: ids of tensors outside the blocks loaded
        elsewhere (the first-order engine's offloaded embeddings)."""
        slots = self.slots_of()
        names: dict[int, list] = {i: [None] * len(pk.params) for i, pk in enumerate(self.packed)}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name not in state:
                if partial:
                    continue
                raise ValueError(f"state_dict: missing {name!r}")
            if id(t) in slots:
                i, j = slots[id(t)]
                names[i][j] = name
            elif id(t) not in skip:
                with torch.no_grad():
                    t.copy_(state[name])
        for i, pk in enumerate(self.packed):
            if all(n is None for n in names[i]):
                continue
            kept = pk.views(self._flat(i)) if None in names[i] else None
            tensors = [state[n] if n is not None else kept[j] for j, n in enumerate(names[i])]
            self.store.put(i, self._stored(i, tensors), version=version)
            del tensors, kept

    def _flat(self, i: int) -> torch.Tensor:
        """Block ``i``'s parameters packed in the packing dtype, read (and decoded) from the store."""
        return self.format.restored(i, self.store.get(i), self.pack_dtype)

    def _stored(self, i: int, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Block ``i``'s host copy of ``tensors`` (its parameters in order), rounded to nearest."""
        return self.format.stored(i, self.packed[i].pack(tensors, self.pack_dtype))

    def close(self, restore: bool = True) -> None:
        """Give the blocks' parameters back to the model (CPU, training dtype) and close the store,
        block by block: the store frees each one as it is handed back (no second copy).
        ``restore=False``: close the store only (the model keeps its placeholders; after a streamed save)."""
        for i, pk in enumerate(self.packed if restore else []):
            flat = self.store.take(i)
            if flat.dtype != self.compute_dtype:
                flat = self.format.restored(i, flat, self.compute_dtype)
            for p, view in zip(pk.params, pk.views(flat)):
                p.data = view  # same dtype: a view of the unpinned host block
        self.store.close()


class ForwardOverrides:
    """Instance-level ``forward`` overrides on a model's modules, so that an engine drives them
    without copying model code (both engines' drivers); :meth:`remove` gives each its own back."""

    def __init__(self):
        self._wrapped: list[nn.Module] = []

    def install(self, module: nn.Module, make: Callable[[Callable], Callable]) -> Callable:
        """``module.forward = make(original)``; returns the original ``forward``."""
        original = module.forward
        module.forward = make(original)
        self._wrapped.append(module)
        return original

    def remove(self) -> None:
        for module in self._wrapped:
            del module.forward
        self._wrapped.clear()
