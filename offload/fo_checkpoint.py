"""The first-order offload engine's optimizer state in a checkpoint, one block at a time.

A checkpoint's ``optimizer.safetensors`` holds ``optimizer.state_dict()`` encoded as tensors named
``state.{idx}.{key}`` (:func:`lowmem.state_encoding.optimizer_state_to_tensors`). The blocks' state
(Fuyou, Liao et al. 2024, §4: on the host or NVMe, :mod:`lowmem.offload.fo_state`) can exceed host RAM,
so it never all comes back at once:

* saving: each block's state tensors are meta placeholders in ``optimizer.state`` meanwhile (shapes and
  dtypes from the state tier's layouts), so the encoding and the file's header are made without them;
  the file is written block by block (:func:`lowmem.safetensors_stream.write_file`), each block's
  tensors read from its tier when its part is written and dropped after;
* loading: the file is read lazily; the blocks' state tensors are left out of what
  ``optimizer.load_state_dict`` gets (their plain numbers go in), and each block's are read from the
  file just before the state tier places that block again (:meth:`StateTier.reset`'s ``fill``),
  in the saved dtypes, as :func:`lowmem.checkpoint.load_optimizer_state` keeps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import torch

from lowmem.checkpoint import load_optimizer_state
from lowmem.safetensors_stream import Part
from lowmem.state_encoding import optimizer_state_from_tensors


class _Deferred:
    """Stands for a block's state tensor (by its name in the file) until the block is placed."""

    def __init__(self, name: str):
        self.name = name


class _Marked(Mapping):
    """``tensors`` with the names of ``defer`` answered by a :class:`_Deferred` (nothing read)."""

    def __init__(self, tensors: Mapping, defer):
        self.tensors, self.defer = tensors, defer

    def __getitem__(self, name: str):
        return _Deferred(name) if self.defer(name) else self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class StreamedState:
    """Checkpoint I/O of ``states`` (a :class:`~lowmem.offload.fo_state.StateTier` of ``optimizer``)."""

    def __init__(self, optimizer, states):
        self.optimizer, self.states = optimizer, states
        self._owner: dict[int, tuple[int, object]] = {}     # id(placeholder) -> (block, entry)
        self._deferred: dict[int, dict[str, str]] = {}      # id(param) -> {state key: name in the file}
        self._file: Mapping | None = None
        self._kept: dict[tuple[int, int, str], torch.Tensor | None] = {}  # the host tier's tensors meanwhile

    def _blocks_of_params(self) -> dict[int, int]:
        return {id(p): k for k, params in enumerate(self.states.params) for p in params}

    # ---- saving ---------------------------------------------------------------------
    @contextlib.contextmanager
    def placeholders(self):
        """Every placed block's state tensors as meta placeholders in ``optimizer.state`` meanwhile
        (the host tier's are put back on exit; the NVMe tier's stay in their files)."""
        saved = self._kept
        for k, entries in self.states.layouts.items():
            for e in entries:
                state = self.optimizer.state[self.states.params[k][e.param]]
                saved[(k, e.param, e.key)] = state.get(e.key)
                state[e.key] = torch.empty(e.shape, dtype=e.dtype, device="meta")
                self._owner[id(state[e.key])] = (k, e)
        try:
            yield
        finally:
            self._owner.clear()
            for (k, j, key), value in saved.items():
                state = self.optimizer.state[self.states.params[k][j]]
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
            saved.clear()
            for k in self.states.off_ram():
                self.states.evict(k)

    def parts(self, tensors: dict[str, torch.Tensor]) -> list[Part]:
        """The encoded optimizer ``tensors`` (placeholders among them) as parts: the rest, then one per block."""
        rest, blocks = {}, {}
        for name, t in tensors.items():
            if id(t) in self._owner:
                k, e = self._owner[id(t)]
                blocks.setdefault(k, []).append((name, e))
            else:
                rest[name] = t
        return [Part.of(rest)] + [Part([(n, e.shape, e.dtype) for n, e in items], self._reader(k, items))
                                  for k, items in sorted(blocks.items())]

    def _reader(self, k: int, items: list):
        def read() -> dict[str, torch.Tensor]:
            if k not in self.states.off_ram():
                return {n: self._kept[(k, e.param, e.key)] for n, e in items}
            self.states.loaded.discard(k)  # its placeholders are in optimizer.state: read the file
            self.states.load(k)
            out = {n: self.optimizer.state[self.states.params[k][e.param]][e.key] for n, e in items}
            self.states.evict(k)  # held by the writer until written, then freed
            return out
        return read

    # ---- loading --------------------------------------------------------------------
    def load(self, tensors: Mapping, meta: dict, where: Path) -> None:
        """Load the optimizer's state from the file's lazy ``tensors`` (and ``meta``) but the blocks'
        state tensors, which :meth:`fill` reads block by block."""
        flat = [p for g in self.optimizer.param_groups for p in g["params"]]
        in_blocks = self._blocks_of_params()

        def defer(name: str) -> bool:
            parts = name.split(".")
            return (len(parts) == 3 and parts[0] == "state" and parts[1].isdigit() and int(parts[1]) < len(flat)
                    and id(flat[int(parts[1])]) in in_blocks)

        state_dict = optimizer_state_from_tensors(_Marked(tensors, defer), meta)
        self._deferred, self._file = {}, tensors
        for idx, s in state_dict["state"].items():
            for key in [key for key, v in s.items() if isinstance(v, _Deferred)]:
                self._deferred.setdefault(id(flat[idx]), {})[key] = s.pop(key).name
        load_optimizer_state(self.optimizer, state_dict, where)

    def fill(self, k: int) -> None:
        """Block ``k``'s state tensors read from the checkpoint into ``optimizer.state`` (before it is placed)."""
        for p in self.states.params[k]:
            for key, name in self._deferred.pop(id(p), {}).items():
                self.optimizer.state[p][key] = self._file[name]
        if not self._deferred:
            self._file = None
