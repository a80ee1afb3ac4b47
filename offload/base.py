"""What both offload engines share: set-up, evaluation, state I/O and shutting down.

ZO2 (:mod:`lowmem.offload.engine`, arXiv 2503.12668) and the first-order engine
(:mod:`lowmem.offload.firstorder`, Fuyou, arXiv 2403.06504) drive the same streamed model
(:class:`~lowmem.offload.streamed.StreamedModel`: blocks packed into a store, uploaded into device
slots ahead of use, the modules outside the blocks on the device); they differ in their schedule,
which each subclass adds with two hooks:

* :meth:`StreamedEngine.flush` -- make the stored weights those of every completed step (ZO2
  applies its deferred update; the first-order engine waits for the host's block steps). Run
  before evaluation and on close; it never changes a number.
* :meth:`StreamedEngine.barrier` -- wait for work in flight without applying anything (the
  first-order engine's host steps; ZO2 has none). Run before the weights are read or replaced.

Public methods of both engines: ``step`` (their own), ``evaluate``, ``eval_loss``,
``state_dict``/``load_state_dict``, ``model_state_dict``/``load_model_state_dict``, ``close``,
``steps``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from lowmem.model_save import saved_state
from lowmem.offload.settings import OffloadSection, offload_section
from lowmem.offload.streamed import StreamedModel, check_blocks, model_units


class StreamedEngine:
    """An engine over ``model`` with its blocks streamed; subclasses add the step and the driver."""

    def __init__(self, model: nn.Module, optimizer, config: OffloadSection | dict | None,
                 device: torch.device | str | None):
        self.config = offload_section(config)
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.blocks, self.units = model_units(model)
        check_blocks(self.blocks, self.units)
        self.compute_dtype = next(self.blocks.parameters()).dtype
        self.steps = 0  # completed steps

    def _stream(self, store_dtype: torch.dtype, pack_dtype: torch.dtype, write_back: bool,
                trained: list[list[bool]] | None = None) -> None:
        """Move the blocks into the store (see :class:`StreamedModel`)."""
        self.streamed = StreamedModel(self.model, self.blocks, self.units, self.device, self.config,
                                      store_dtype, pack_dtype, write_back=write_back, trained=trained)
        self.packed, self.store, self.mover = self.streamed.packed, self.streamed.store, self.streamed.mover

    # ---- the schedule's hooks ----------------------------------------------------------
    def flush(self) -> None:
        """The stored weights become those of every completed step."""
        self.barrier()

    def barrier(self) -> None:
        """Wait for the work in flight."""

    @contextlib.contextmanager
    def _evaluating(self):
        """Around a forward outside training: no autograd; a block pass cut short is forgotten."""
        try:
            with torch.no_grad():
                yield
        except BaseException:
            self.mover.abort()
            raise

    # ---- evaluation --------------------------------------------------------------------
    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def evaluate(self, metrics_fn: Callable, batch: dict):
        """``metrics_fn(model, batch)`` (the run's eval metrics) with the current weights, blocks streamed."""
        self.flush()
        with self._evaluating():
            return metrics_fn(self.model, self._on_device(batch))

    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The model's loss on ``batch`` with the current weights (a streamed no-grad forward)."""
        self.flush()
        with self._evaluating():
            out = self.model(**self._on_device(batch), use_cache=False)
        return out.loss.detach()

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Steps and the optimizer's state (plain numbers and tensors); subclasses add their own."""
        return {"steps": self.steps, "optimizer": self._optimizer_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the weights must be the ones saved with it."""
        self.steps = int(state["steps"])
        self._load_optimizer_state(state["optimizer"])

    def _optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state on the CPU, blocks read from the store (in the packing dtype)."""
        self.barrier()
        return self.streamed.model_state_dict()

    def load_model_state_dict(self, state: Mapping, partial: bool = False, skip: set[int] = frozenset()) -> None:
        """Load weights saved by :meth:`model_state_dict` (blocks go to the store, one at a time: a lazy
        ``state`` streams); ``partial``: a name not in ``state`` keeps its value; ``skip``: ids of parameters
        outside the blocks that the subclass loads itself."""
        self.barrier()
        self.streamed.load_model_state_dict(state, self.steps, partial, skip)

    def export_parts(self) -> list:
        """The model's weights of every completed step, as ``save_pretrained`` writes them, one part per
        block read from the store when written (:meth:`StreamedModel.parts`)."""
        self.flush()
        return self.streamed.parts(self.compute_dtype, functools.partial(saved_state, self.model))

    def checkpoint_parts(self, names: set[str]) -> list:
        """The weights a checkpoint stores (``names``: the trainable parameters, tied ones once), as stored:
        blocks in the packing dtype (ZO2's training dtype, the first-order fp32 masters), one block read at
        a time when written. A deferred update stays pending (the checkpoint's ``extra`` holds it)."""
        self.barrier()
        return self.streamed.parts(self.streamed.pack_dtype, lambda state: {n: t for n, t in state.items() if n in names},
                                   lambda name: name in names, self._masters())

    def _masters(self) -> dict:
        """id(parameter outside the blocks) -> its stored value where that is not the parameter itself."""
        return {}

    def close(self, restore: bool = True) -> None:
        """Flush, give the blocks' parameters back to the model (CPU, training dtype), remove the overrides.
        ``restore=False``: the blocks are not brought back (the model is left unusable; a run's end)."""
        self.flush()
        self.streamed.close(restore)
        self.driver.remove()
