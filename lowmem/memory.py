"""Measure memory: optimizer-state bytes, peak RSS, peak CUDA memory, saved-activation bytes.

Measured, never estimated: state bytes are summed over the optimizer's own
tensors (``optimizer.state``), peak RSS comes from the kernel (``ru_maxrss``),
saved-activation bytes from ``torch.autograd.graph.saved_tensors_hooks``.

:func:`training_step` is the one step whose memory is measured here and predicted
by :mod:`lowmem.planner` (which runs the same function on fake tensors);
``python -m lowmem.memory RECIPE.yaml [--forward]`` measures it in a fresh process
(:func:`measure_step`) and prints JSON.

Both that process and ``lowmem-train`` first call :func:`fix_malloc_threshold`, so that on
glibc the memory of a freed tensor goes back to the OS and peak RSS follows the live tensors
(the planner's model); without it a step's peak RSS carries hundreds of MiB of freed, retained
heap (issue #8). A script of your own (e.g. with the Hugging Face ``Trainer``) can call it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import sys
from types import SimpleNamespace
from typing import Callable

import torch

from lowmem.dtypes import AUTOCAST_DTYPES


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> int:
    """Bytes held in tensors of ``optimizer.state`` (for ``params`` only, if given).

    Scalar step counters are included: they are part of the state a checkpoint carries.
    """
    wanted = None if params is None else {id(p) for p in params}
    total = 0
    for p, state in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        total += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (``VmHWM``) to the current RSS, so that
    :func:`window_peak_rss_bytes` reports the peak from now on (Linux; False elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``; ``ru_maxrss`` is not reset)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return peak_rss_bytes()


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


M_MMAP_THRESHOLD = -3      # mallopt parameter number (glibc malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default threshold, kept fixed
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def fix_malloc_threshold() -> bool:
    """Keep glibc's mmap threshold at its default 128 KiB instead of letting it grow (issue #8).

    glibc serves blocks above the threshold with ``mmap`` and unmaps them when freed, but each
    such free raises the threshold to the freed size (up to 32 MiB, ``mallopt(3)``); tensors of
    that size then come from the heap, whose freed memory stays resident (only the top is
    trimmed). Measured on SmolLM2-135M shapes, batch 2 x 256, fp32, APOLLO-Mini with 8-bit
    states, layer-wise, checkpointing (fresh processes, 2-core CPU): peak RSS 1575-1625 MiB
    after one step and 1820-1830 MiB after four with the dynamic threshold, 1358 and 1422 MiB
    with it fixed, while the planner's baseline + live tensors is 1321 MiB. The price is a page
    fault per fresh page of every block above 128 KiB: about 10% more step time on that run. Setting one of the ``MALLOC_*_`` tunables of
    :data:`MALLOC_ENV` (which also fixes the threshold) is the user's choice and left alone.
    Returns whether the threshold was set here (False off glibc)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def cuda_peak_bytes(device: torch.device | None = None) -> int | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device)


class SavedTensorMeter:
    """Counts bytes that autograd saves for backward inside the ``with`` block.

    Tensors sharing storage are counted once (a view saved twice costs nothing extra).
    """

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def _autocast(recipe, device_type: str):
    dtype = AUTOCAST_DTYPES.get(recipe.train.mixed_precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def recipe_loss(recipe, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The run's LM loss (:func:`lowmem.build.lm_loss`: chunked when ``train.loss_chunk_tokens``)."""
    from lowmem.build import lm_loss

    return lm_loss(recipe.train)(model, batch)


def training_step(recipe, model: torch.nn.Module, optimizer, batch: dict[str, torch.Tensor],
                  zeroth_order: bool, on_phase: Callable[[str], None] = lambda phase: None) -> None:
    """One optimizer step of ``recipe`` on one micro-batch, as the trainer takes it:
    forward, backward, clip (first order, not layer-wise), ``step``, ``zero_grad``; or
    ``step(closure)`` with a no-grad forward (zeroth order). ``on_phase`` is told
    "forward", "backward", "step" as each begins (the planner labels memory by phase)."""
    device_type = batch["input_ids"].device.type
    if zeroth_order:
        on_phase("forward")

        def closure():
            with torch.no_grad(), _autocast(recipe, device_type):
                return recipe_loss(recipe, model, batch)

        optimizer.step(closure)
        return
    on_phase("forward")
    with _autocast(recipe, device_type):
        loss = recipe_loss(recipe, model, batch)
    on_phase("backward")
    loss.backward()
    del loss
    on_phase("step")
    if recipe.optim.max_grad_norm and not recipe.optim.layerwise:
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def no_grad_forward(recipe, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """The reference every step peak is compared with: one forward without autograd."""
    with torch.no_grad(), _autocast(recipe, batch["input_ids"].device.type):
        model(**batch, use_cache=False)


def random_batch(recipe, vocab_size: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A (batch_size, seq_len) batch of token ids with labels, from a fixed generator."""
    gen = torch.Generator().manual_seed(recipe.train.seed)
    ids = torch.randint(0, vocab_size, (recipe.train.batch_size, recipe.train.seq_len), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def measure_step(recipe, forward_only: bool = False) -> dict:
    """Build ``recipe``'s model (``model.config`` or loaded, with its ``activations`` section
    applied) and optimizer, take one
    :func:`training_step` (or one no-grad forward) and report measured bytes: RSS
    after the imports (the runtime baseline), peak RSS, parameters, gradients (just
    before ``step``), optimizer state, and the CUDA peak when on a GPU.
    Run it in a fresh process (``python -m lowmem.memory``) so the peak is this step's."""
    from lowmem.activations import apply_activations
    from lowmem.build import build_optimizer
    from lowmem.models import load_model

    baseline = current_rss_bytes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(recipe.model).to(device)
    apply_activations(model, recipe.activations, recipe.train.seed)  # WTA-CRS, lean modules: as the trainer
    batch = random_batch(recipe, model.config.vocab_size, device)
    params = {id(p): p for p in model.parameters()}.values()
    out = {"baseline_rss": baseline, "param_bytes": sum(tensor_bytes(p) for p in params), "grad_bytes": 0}
    if forward_only:
        no_grad_forward(recipe, model, batch)
    else:
        optimizer, zeroth_order, _ = build_optimizer(recipe, model, SimpleNamespace(num_processes=1))

        def on_phase(phase: str) -> None:
            if phase == "step":
                out["grad_bytes"] = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)

        training_step(recipe, model, optimizer, batch, zeroth_order, on_phase)
        out["state_bytes"] = state_bytes(optimizer)
    return {**out, "peak_rss": peak_rss_bytes(), "cuda_peak": cuda_peak_bytes()}


if __name__ == "__main__":
    fix_malloc_threshold()
    from lowmem.recipe import load_recipe

    print(json.dumps(measure_step(load_recipe(sys.argv[1]), forward_only="--forward" in sys.argv[2:])))
