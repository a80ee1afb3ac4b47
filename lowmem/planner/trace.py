"""One training step traced on fake tensors: the bytes of live tensor storages, by part (issue #8).

The model is built from its config alone under ``FakeTensorMode``: tensors carry shapes and
dtypes but no storage. The real optimizer (:func:`lowmem.build.build_optimizer`) is built on
it and the trainer's own step object (:mod:`lowmem.steps`, through
:func:`lowmem.build.recipe_step`) runs on it, while a dispatch mode (:class:`_LiveBytes`)
counts the bytes of every live tensor storage (freed storages are subtracted through
weak-reference finalizers). So the parameter, gradient and optimizer-state parts are the real
tensors' byte counts, and activations (sequence length, batch, gradient checkpointing, WTA-CRS,
autocast) follow from the real forward/backward code.

What the trainer's step does is traced as it runs, not modelled: the recipe's objective
(``data.task``: the LM loss, a chunked ``train.loss_chunk_tokens`` one included, or candidate
classification), ``train.grad_accum`` micro-batches, eval mode and fp32 forwards of a
zeroth-order step, the run's autocast, the gradient-norm clipping.

The micro-batch (:func:`lowmem.build.sample_batch`) holds real tensors: an op whose tensor
inputs are all real runs for real, so the batch's own data-dependent values (a classification
batch's option lengths and padding) are exact.

The peak is the largest live total, split at that moment into weights, gradients, optimizer
states, activations (forward/backward tensors) and step temporaries (allocated by
``optimizer.step`` or, layer-wise, by the update hooks in backward).

The 8-bit kernels run fused (Triton on CUDA, C on the CPU: :mod:`lowmem.kernels.blockwise_cpu`):
the step writes in place and (de)quantizing allocates only its outputs. Fake tensors take the
PyTorch reference path, so those reference functions are replaced by stubs that allocate just
that (:func:`_kernels`), unless a CPU run has no C compiler and runs the references itself.

Data-dependent values of fake tensors: ``.item()`` reads 1; ``torch.unique`` returns its
largest possible size (WTA-CRS stores at most k rows), so WTA-CRS activations are an
upper bound.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from unittest import mock

import torch
from torch._subclasses.fake_tensor import (DynamicOutputShapeException, FakeTensor, FakeTensorMode,
                                          unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from lowmem.activations import apply_activations
from lowmem.build import no_grad_forward, recipe_step, sample_batch
from lowmem.dtypes import float_dtype
from lowmem.kernels import adamw8bit_step, blockwise_cpu, dynamic_map, quantize
from lowmem.memory import tensor_bytes
from lowmem.models import enable_checkpointing, select_trained
from lowmem.planner.fake_base import fake_friendly_to, quantization_constants, quantize_base
from lowmem.recipe import Recipe

PARTS = ("runtime", "weights", "gradients", "optimizer_states", "activations", "step_temporaries",
         "transfer_buffers")
_PHASE_PART = {"setup": "weights", "forward": "activations", "backward": "activations", "step": "step_temporaries"}


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages by part; remembers the parts at the peak."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.fake_mode, self.phase = fake_mode, "setup"
        self.live: dict[int, list] = {}            # token -> [bytes, part]
        self.by_part = dict.fromkeys(PARTS, 0)
        self.peak, self.at_peak, self.peak_token = 0, dict(self.by_part), -1
        self.phase_peaks: dict[str, tuple[int, dict, int]] = {}  # "backward" (with forward) / "step"
        self._token_of = weakref.WeakKeyDictionary()  # storage -> token
        self._tokens = itertools.count()

    def add(self, t, part: str | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        token = self._token_of.get(storage)
        if token is None:
            token = self._token_of[storage] = next(self._tokens)
            self.live[token] = [storage.nbytes(), _PHASE_PART[self.phase]]
            self.by_part[self.live[token][1]] += storage.nbytes()
            weakref.finalize(storage, self._free, token)
        if part is not None:
            self.relabel(token, part)
        total = sum(self.by_part.values())
        if total > self.peak:
            self.peak, self.at_peak, self.peak_token = total, dict(self.by_part), token
        group = "step" if self.phase == "step" else "backward" if self.phase != "setup" else None
        if group and total > self.phase_peaks.get(group, (0,))[0]:
            self.phase_peaks[group] = (total, dict(self.by_part), token)

    def relabel(self, token: int, part: str) -> None:
        nbytes, old = self.live[token]
        self.by_part[old] -= nbytes
        self.by_part[part] += nbytes
        self.live[token][1] = part

    def token(self, t: torch.Tensor) -> int:
        return self._token_of[t.untyped_storage()]

    def _free(self, token: int) -> None:
        nbytes, part = self.live.pop(token)
        self.by_part[part] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):  # the batch's own values: exact
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        elif func is torch.ops.aten._local_scalar_dense.default:
            return 1  # .item() on a fake tensor: any plain value takes the ordinary code path
        else:
            try:
                out = func(*args, **kwargs)
            except DynamicOutputShapeException:
                out = self._largest_output(func, args, kwargs)
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out

    def _largest_output(self, func, args, kwargs):
        """Run a data-dependent op (unique, nonzero) on distinct real values: its largest output."""
        def real(t):
            return torch.arange(t.numel()).reshape(t.shape).to(t.dtype) if isinstance(t, torch.Tensor) else t

        with unset_fake_temporarily():
            out = func(*tree_map(real, args), **tree_map(real, kwargs))
        return tree_map(lambda t: self.fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, out)


def fake_model(section, config):
    """The model of ``section`` built from ``config`` (call under ``FakeTensorMode``) as
    :func:`lowmem.models.load_model` builds it: cast to ``model.dtype``, or, with ``model.quantize``, read in
    that dtype (``from_pretrained``) and its base quantized; then checkpointing, adapters and the trained
    subset. bitsandbytes' layers and the moves of fake parameters: :mod:`lowmem.planner.fake_base`."""
    from transformers import AutoModelForCausalLM

    dtype = float_dtype(section.dtype)
    with fake_friendly_to():
        if section.quantize is None:
            model = AutoModelForCausalLM.from_config(config).to(dtype)
        else:
            model = quantize_base(AutoModelForCausalLM.from_config(config, dtype=dtype), section.quantize, dtype)
        if section.gradient_checkpointing:
            enable_checkpointing(model)
        return select_trained(model, section).train()


def held_tensors(model) -> list[torch.Tensor]:
    """What a built model holds: its parameters (a tied one once), buffers and quantization constants."""
    return list({id(p): p for p in model.parameters()}.values()) + list(model.buffers()) + \
        quantization_constants(model)


def _build_on_fake(recipe: Recipe, config, tracker: _LiveBytes):
    """Model (+ WTA-CRS, lean modules), optimizer and the trainer's step object, built by the engine's
    own functions on fake tensors."""
    model = fake_model(recipe.model, config)
    apply_activations(model, recipe.activations, recipe.train.seed)
    for t in held_tensors(model):
        tracker.add(t, "weights")
    trainable = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]

    def gradient_done(p) -> None:
        tracker.add(p.grad, "gradients")
        tracker.phase = "step"  # a layer-wise update may follow

    for p in trainable:  # before the layer-wise hooks, which update the parameter and free its gradient
        p.register_post_accumulate_grad_hook(gradient_done)
    stepper, zeroth_order = recipe_step(recipe, model)
    for p in trainable:  # after them: back to backward
        p.register_post_accumulate_grad_hook(lambda p: setattr(tracker, "phase", "backward"))
    stepper.on_phase = lambda phase: setattr(tracker, "phase", phase)
    return stepper, zeroth_order


@contextlib.contextmanager
def _kernels(device: str):
    """Fake tensors take the reference path of the 8-bit kernels (never Triton, not even under
    TRITON_INTERPRET) and a private dynamic-map cache. For a CUDA plan, and a CPU plan where the C
    kernels build, the reference functions are replaced by stand-ins with the fused kernels'
    allocations: the fused step writes in place, (de)quantizing allocates only its outputs (the
    C Adam step's two 256 KiB scratch buffers per thread are left out)."""
    def quantize_outputs(x, code, blocksize=256):
        return (torch.empty(x.numel(), dtype=torch.uint8, device=x.device),
                torch.empty(quantize.num_blocks(x.numel(), blocksize), dtype=torch.float32, device=x.device))

    def dequantize_output(codes, absmax, code, blocksize=256, shape=None):
        return torch.empty(codes.numel() if shape is None else shape, dtype=torch.float32, device=codes.device)

    def in_place(*args, **kwargs):
        return None

    def no_triton(t):
        return False

    fake_maps = functools.lru_cache(maxsize=None)(dynamic_map._cached.__wrapped__)  # fake maps stay in here
    patches = [(quantize, "use_triton", no_triton), (adamw8bit_step, "use_triton", no_triton),
               (dynamic_map, "_cached", fake_maps)]
    if device == "cuda" or blockwise_cpu.library() is not None:
        patches += [(adamw8bit_step, "adam8bit_step_ref", in_place),
                    (adamw8bit_step, "momentum8bit_step_ref", in_place),
                    (quantize, "quantize_blockwise_ref", quantize_outputs),
                    (quantize, "dequantize_blockwise_ref", dequantize_output)]
    with contextlib.ExitStack() as stack:
        for module, name, value in patches:
            stack.enter_context(mock.patch.object(module, name, value))
        yield


def trace_step(recipe: Recipe, config, batch_factor: int = 1, forward_only: bool = False,
               device: str = "cpu") -> tuple[dict[str, int], dict[str, int]]:
    """(bytes by part at the peak, totals) of one step of the trainer's step object (or one no-grad
    forward) on fake tensors, with ``device``'s kernels; the micro-batch's rows repeated ``batch_factor`` times."""
    tracker, totals, states = _trace(recipe, config, batch_factor, forward_only, device)
    return _with_states(tracker, tracker.at_peak, tracker.peak_token, states), totals


def trace_phases(recipe: Recipe, config, device: str = "cpu") -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """({"backward": parts, "step": parts}, totals): the largest live total while the forward and
    backward run, and while the optimizer steps (a first-order offloaded run's two phases, with
    different buffers beside them: :mod:`lowmem.planner.first_order`)."""
    tracker, totals, states = _trace(recipe, config, 1, False, device)
    return {group: _with_states(tracker, parts, token, states)
            for group, (_, parts, token) in tracker.phase_peaks.items()}, totals


def _trace(recipe: Recipe, config, batch_factor: int, forward_only: bool, device: str):
    batch = {k: v.repeat(batch_factor, *[1] * (v.dim() - 1))
             for k, v in sample_batch(recipe, config.vocab_size).items()}
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = _LiveBytes(fake)
    with fake, _kernels(device):
        stepper, zeroth_order = _build_on_fake(recipe, config, tracker)
        model, optimizer = stepper.model, stepper.inner_optimizer
        weights = tracker.by_part["weights"]
        with tracker:
            tracker.phase = "forward"
            if forward_only:
                no_grad_forward(recipe, model, batch)
            else:
                stepper.step(lambda micro: batch)
        states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        states = list({tracker.token(v): v for v in states}.values())
        grads = sum(tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    totals = {"weights": weights, "gradients": 0 if zeroth_order else grads, "trained": grads,
              "optimizer_states": sum(tensor_bytes(v) for v in states)}
    return tracker, totals, states


def _with_states(tracker: _LiveBytes, parts: dict[str, int], peak_token: int, states) -> dict[str, int]:
    """``parts`` (a peak snapshot) with the state tensors' bytes moved to ``optimizer_states`` (states
    persist, so one allocated before the peak, as a step temporary or else, was live at it)."""
    parts = dict(parts)
    for t in states:
        token = tracker.token(t)
        nbytes, part = tracker.live[token]
        if part != "optimizer_states" and token <= peak_token:
            parts[part] -= nbytes
            parts["optimizer_states"] += nbytes
    return parts


def fake_optimizer_step(recipe: Recipe, config, device: str = "cpu"):
    """``(model, optimizer)``: ``recipe``'s model built from ``config`` on fake tensors and the optimizer of
    its step object after one step on zero gradients, so its state holds what a run allocates (read
    with ``numel``/``element_size``; a data-dependent scalar reads 1, as in the trace)."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, _kernels(device):
        model = fake_model(recipe.model, config)
        optimizer = recipe_step(recipe, model)[0].inner_optimizer  # the run's step object's optimizer
        for p in {id(p): p for p in model.parameters()}.values():
            p.grad = torch.zeros_like(p)
        with _LiveBytes(fake):  # reads a data-dependent scalar (.item()) as the trace does
            optimizer.step()
    return model, optimizer
