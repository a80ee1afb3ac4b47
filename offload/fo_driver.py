"""Cutting a Hugging Face causal LM's autograd graph at the decoder-block boundaries.

Fuyou (Liao et al., 2024, arXiv 2403.06504, §4) trains a model whose blocks do not fit on
the GPU: the forward streams the blocks through the device and keeps only each block's
input activation; the backward streams them again in reverse and recomputes each block
from that activation (activation checkpointing at block granularity). We do it with the
model's own ``forward`` and an instance-level ``forward`` override on each block, found
as in ZO2 (:func:`lowmem.offload.streamed.model_units`):

* recording forward (a training step): block ``k`` runs **without autograd** on the input
  ``x_k`` it receives (a tensor with the graph back to the previous block's output leaf,
  or to the embeddings for block 0); ``x_k``, the call's other arguments and the RNG
  state are kept, and the block's output is returned as a fresh leaf ``h_k`` that requires
  grad. The code after the last block (final norm, ``lm_head``, loss) builds an ordinary
  graph from ``h_{N-1}``, so ``loss.backward()`` gives the head's gradients and
  ``h_{N-1}.grad``;
* :meth:`BlockDriver.backward_block` (``k`` from ``N-1`` down to 0): recompute the block on
  ``x_k.detach()`` with the saved RNG state (dropout identical), backprop ``h_k.grad``
  through it (block parameter gradients, ``dx_k``), then backprop ``dx_k`` through the
  graph of ``x_k`` (into ``h_{k-1}.grad``, or into the embeddings for ``k = 0``).

Activation swapping (``swap`` blocks, :mod:`lowmem.offload.fo_swap` decides how many): once
block ``k`` has run, its input ``x_k`` (for ``1 <= k <= swap``, when it is the leaf ``h_{k-1}``)
is copied to host memory on the offload lane and the leaf's device storage is released (the
leaf keeps its autograd identity); the backward of block ``k`` brings it back on the upload lane
(and starts bringing ``x_{k-1}``) before recomputing. The bytes are copied, never converted.

Every gradient is the one a single in-memory backward computes, with the same kernels on
the same operands, so in fp32 training matches in-memory layer-wise training bit for bit.
Outside a recording forward (evaluation) a block just runs, streamed in by the mover.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowmem.offload.streamed import ForwardOverrides, model_units


_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _no_cache(kwargs: dict) -> dict:
    """The call without a KV cache: a block run twice (forward, recompute) must not append twice."""
    out = {k: (None if k in _CACHE_KEYS or type(v).__name__.endswith("Cache") else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_first(out: Any, h: torch.Tensor) -> Any:
    return h if isinstance(out, torch.Tensor) else type(out)((h, *out[1:]))


def rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_rng(states: tuple, device: torch.device):
    """Run with the RNG states of the original forward; the outer RNG is left untouched."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state(states[1], device)
        yield


@dataclass
class Saved:
    """What the backward of one block needs from the forward."""

    inp: torch.Tensor    # x_k as the model passed it (with its graph)
    args: tuple
    kwargs: dict
    rng: tuple
    out: torch.Tensor    # the leaf h_k returned instead of the block output


class BlockDriver:
    """Installs the block overrides; ``recording`` is on during a training forward."""

    def __init__(self, model: nn.Module, device: torch.device, mover):
        self.blocks, self.units = model_units(model)
        self.device, self.mover = device, mover
        self.recording = False
        self.swap = 0              # block inputs x_1 .. x_swap go to the host during a recording forward
        self.timer = None          # a fo_swap.BlockTimer during the profile step
        self.last_boundary = None  # a block input seen by the profile step (its copy bandwidth is measured)
        self.swapped: dict[int, tuple] = {}  # k -> (host copy of x_k, event of the copy)
        self.saved: dict[int, Saved] = {}
        self.overrides = ForwardOverrides()
        self._original: list[Callable] = [self.overrides.install(block, self._forward_of(i))
                                          for i, block in enumerate(self.blocks)]

    def _forward_of(self, i: int) -> Callable[[Callable], Callable]:
        def make(original: Callable) -> Callable:
            def forward(*args, **kwargs):
                return self._run(i, args, kwargs)
            return forward
        return make

    def _run(self, i: int, args: tuple, kwargs: dict) -> Any:
        mover = self.mover
        if not mover.in_pass():  # a forward streams every block in order
            mover.begin(list(range(len(self.blocks))))
        mover.acquire(i)
        try:
            if not self.recording:
                return self._original[i](*args, **kwargs)
            kwargs = _no_cache(kwargs)
            x, rng = _hidden(args, kwargs), rng_states(self.device)
            call_args, call_kwargs = _with_hidden(args, kwargs, x.detach())
            if self.timer is not None:
                self.last_boundary = x.detach()
                self.timer.start()
            with torch.no_grad():
                out = self._original[i](*call_args, **call_kwargs)
            if self.timer is not None:
                self.timer.stop()
        finally:
            mover.release(i, write_back=False, version=0, round_seed=0)
        leaf = _first(out).detach().requires_grad_(True)
        self.saved[i] = Saved(x, args, kwargs, rng, leaf)
        if 1 <= i <= self.swap and self.saved[i - 1].out is x:
            self._swap_out(i, x)
        return _replace_first(out, leaf)

    def _swap_out(self, k: int, x: torch.Tensor) -> None:
        """Copy ``x_k`` (the leaf ``h_{k-1}``) to the host; release its device storage."""
        lanes = self.mover.lanes
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.device.type == "cuda")
        with lanes.offload.use():
            lanes.offload.wait(lanes.compute.record())
            host.copy_(x.detach(), non_blocking=True)
            if lanes.offload.stream is not None:
                x.record_stream(lanes.offload.stream)
            copied = lanes.offload.record()
        x.data = torch.empty(0, dtype=x.dtype, device=self.device)
        self.swapped[k] = (host, copied)

    def _swap_in(self, k: int) -> None:
        """Start bringing ``x_k`` back to the device (upload lane); compute waits for it."""
        if k not in self.swapped:
            return
        host, copied = self.swapped.pop(k)
        lanes = self.mover.lanes
        with lanes.upload.use():
            lanes.upload.wait(copied)
            back = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            back.copy_(host, non_blocking=True)
            uploaded = lanes.upload.record()
        lanes.compute.wait(uploaded)
        if lanes.compute.stream is not None:
            back.record_stream(lanes.compute.stream)
        self.saved[k].inp.data = back

    def backward_block(self, k: int, autocast: Callable) -> torch.Tensor | None:
        """Recompute block ``k`` (resident now) and backprop its output gradient into its
        parameters; return ``dx_k`` (None when the input needs no gradient)."""
        s = self.saved[k]
        self._swap_in(k)
        self._swap_in(k - 1)  # ahead: overlaps this block's recompute
        if s.out.grad is None:
            raise RuntimeError(f"offload: the output of block {k} did not reach the loss")
        x = s.inp.detach().requires_grad_(s.inp.requires_grad)
        args, kwargs = _with_hidden(s.args, s.kwargs, x)
        with torch.enable_grad(), replayed_rng(s.rng, self.device), autocast():
            out = _first(self._original[k](*args, **kwargs))
        torch.autograd.backward(out, s.out.grad)
        return x.grad

    def propagate(self, k: int, dx: torch.Tensor | None) -> None:
        """Backprop ``dx_k`` through the graph of block ``k``'s input; forget block ``k``."""
        s = self.saved.pop(k)
        if dx is not None and s.inp.requires_grad:
            torch.autograd.backward(s.inp, dx)

    def forget(self) -> None:
        self.saved.clear()
        self.swapped.clear()

    def remove(self) -> None:
        self.overrides.remove()
