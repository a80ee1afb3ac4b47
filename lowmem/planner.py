"""The memory planner: predict a recipe's peak memory for one training step, without weights.

How (issue #8): the model is built from its config alone (``model.config``, a local/hub
``config.json``, or a GGUF header) under ``FakeTensorMode``: tensors carry shapes and
dtypes but no storage. The real optimizer (:func:`lowmem.build.build_optimizer`) is built
on it and the trainer's own step (:func:`lowmem.memory.training_step`) runs on it, while
a dispatch mode counts the bytes of every live tensor storage (freed storages are
subtracted through weak-reference finalizers). So the parameter, gradient and optimizer
state parts are the real tensors' byte counts, and activations (sequence length, batch,
gradient checkpointing, WTA-CRS, autocast) follow from the real forward/backward code.

Peak = largest live total, split at that moment into weights, gradients, optimizer
states, activations (forward/backward tensors) and step temporaries (allocated by
``optimizer.step``). Two pieces are modelled, not traced:

* CPU: a process holds a runtime baseline besides tensors (Python, torch, transformers
  code and allocator pools). It is measured once: a fresh process imports the same
  modules, builds a two-layer model of the same ``model_type`` and reports RSS minus
  its tensor bytes (:func:`runtime_baseline_bytes`). CUDA: no baseline
  (``max_memory_allocated`` counts tensors only).
* CUDA: the 8-bit kernels run in Triton, fused: the step writes in place and (de)quantizing
  allocates only its outputs. Fake tensors take the CPU reference path, so for a CUDA plan
  those reference functions are replaced by stubs that allocate just that (:func:`_kernels`).
* ZO2 offload on a GPU: only resident parameters (embeddings, norms, head) stay on the
  device; ``prefetch_depth + 1`` blocks in ``offload.host_dtype`` are the transfer
  buffers; activations are those of a ZO step on the doubled batch (the dual forward).

Data-dependent values on fake tensors: ``.item()`` reads 1; ``torch.unique`` returns its
largest possible size (WTA-CRS stores at most k rows), so WTA-CRS activations are an
upper bound.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import subprocess
import sys
import weakref
from dataclasses import dataclass, field
from unittest import mock
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from lowmem.memory import no_grad_forward, random_batch, tensor_bytes, training_step
from lowmem.recipe import Recipe

PARTS = ("runtime", "weights", "gradients", "optimizer_states", "activations", "step_temporaries",
         "transfer_buffers")
_PHASE_PART = {"setup": "weights", "forward": "activations", "backward": "activations", "step": "step_temporaries"}


@dataclass
class Plan:
    """A predicted step peak on ``device``: ``parts`` (bytes live at the peak, summing to
    ``peak_bytes``) and ``totals`` (whole-run sizes: all weights, all gradients, the state)."""

    device: str
    parts: dict[str, int]
    totals: dict[str, int]
    capacity_bytes: int | None = None
    suggestions: list[tuple[str, list[str], int]] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity_bytes is None or self.peak_bytes <= self.capacity_bytes


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages by part; remembers the parts at the peak."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.fake_mode, self.phase = fake_mode, "setup"
        self.live: dict[int, list] = {}            # token -> [bytes, part]
        self.by_part = dict.fromkeys(PARTS, 0)
        self.peak, self.at_peak, self.peak_token = 0, dict(self.by_part), -1
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
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1  # .item() on a fake tensor: any plain value takes the ordinary code path
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


def model_config(section):
    """The model's ``PretrainedConfig`` without loading weights (GGUF: the file's header)."""
    from transformers import AutoConfig

    from lowmem.models import resolve_path

    if section.config is not None:
        cfg = dict(section.config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    source = resolve_path(section.path, "model.path")
    kwargs = {"gguf_file": section.gguf_file} if section.gguf_file else {}
    return AutoConfig.from_pretrained(source, **kwargs)


def config_section(recipe: Recipe, config) -> Recipe:
    """``recipe`` with ``model.config`` set from ``config`` (random init of the same shapes)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    model = recipe.model.model_copy(update={"path": None, "gguf_file": None, "config": cfg, "tokenizer": "bytes"})
    return recipe.model_copy(update={"model": model})


def _fake_model(section, config):
    """The model of ``section`` built from ``config`` (call under ``FakeTensorMode``). As
    :func:`lowmem.models.load_model`, except the dtype is given to ``from_config``:
    ``.to(dtype)`` cannot swap a tied fake parameter."""
    from transformers import AutoModelForCausalLM

    from lowmem.models import DTYPES

    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[section.dtype])
    if section.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _build_on_fake(recipe: Recipe, config, tracker: _LiveBytes):
    """Model (+ WTA-CRS) and optimizer built by the engine's own functions, on fake tensors."""
    from lowmem.build import build_optimizer

    model = _fake_model(recipe.model, config)
    if recipe.activations.wta_crs is not None:
        from lowmem.activations import apply_wta_crs

        wta = recipe.activations.wta_crs
        apply_wta_crs(model, wta.keep_ratio, targets=wta.targets, seed=recipe.train.seed)
    params = list({id(p): p for p in model.parameters()}.values())
    for t in params + list(model.buffers()):
        tracker.add(t, "weights")
    trainable = [p for p in params if p.requires_grad]

    def gradient_done(p) -> None:
        tracker.add(p.grad, "gradients")
        tracker.phase = "step"  # a layer-wise update may follow

    for p in trainable:  # before the layer-wise hooks, which update the parameter and free its gradient
        p.register_post_accumulate_grad_hook(gradient_done)
    optimizer, zeroth_order, _ = build_optimizer(recipe, model, SimpleNamespace(num_processes=1))
    for p in trainable:  # after them: back to backward
        p.register_post_accumulate_grad_hook(lambda p: setattr(tracker, "phase", "backward"))
    return model, optimizer, zeroth_order


@contextlib.contextmanager
def _kernels(device: str):
    """Fake tensors take the reference path of the 8-bit kernels (never Triton, not even under
    TRITON_INTERPRET) and a private dynamic-map cache. For a CUDA plan the reference functions are replaced by stand-ins with
    the Triton kernels' allocations: the fused step writes in place, (de)quantizing allocates
    only its outputs."""
    from lowmem.kernels import adamw8bit_step, dynamic_map, quantize

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
    if device == "cuda":
        patches += [(adamw8bit_step, "adam8bit_step_ref", in_place), (adamw8bit_step, "momentum8bit_step_ref", in_place),
                    (quantize, "quantize_blockwise_ref", quantize_outputs),
                    (quantize, "dequantize_blockwise_ref", dequantize_output)]
    with contextlib.ExitStack() as stack:
        for module, name, value in patches:
            stack.enter_context(mock.patch.object(module, name, value))
        yield


def trace_step(recipe: Recipe, config, batch_factor: int = 1, forward_only: bool = False,
               device: str = "cpu") -> tuple[dict[str, int], dict[str, int]]:
    """(bytes by part at the peak, totals) of one :func:`training_step` (or one no-grad forward)
    on fake tensors, with ``device``'s kernels."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = _LiveBytes(fake)
    with fake, _kernels(device):
        model, optimizer, zeroth_order = _build_on_fake(recipe, config, tracker)
        batch = random_batch(recipe, config.vocab_size)
        batch = {k: v.repeat(batch_factor, 1) for k, v in batch.items()}
        weights = tracker.by_part["weights"]
        with tracker:
            tracker.phase = "forward"
            if forward_only:
                no_grad_forward(recipe, model, batch)
            else:
                training_step(recipe, model, optimizer, batch, zeroth_order,
                              on_phase=lambda phase: setattr(tracker, "phase", phase))
        states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        for t in {tracker.token(v): v for v in states}.values():
            _state_at_peak(tracker, t)
        grads = sum(tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    totals = {"weights": weights, "gradients": 0 if zeroth_order else grads,
              "optimizer_states": sum(tensor_bytes(v) for v in states)}
    return tracker.at_peak, totals


def _state_at_peak(tracker: _LiveBytes, t: torch.Tensor) -> None:
    """Move a state tensor's bytes to ``optimizer_states`` in the peak snapshot (states persist,
    so one allocated before the peak was live at it)."""
    nbytes, part = tracker.live[tracker.token(t)]
    if part != "optimizer_states" and tracker.token(t) <= tracker.peak_token:
        tracker.at_peak[part] -= nbytes
        tracker.at_peak["optimizer_states"] += nbytes


@functools.lru_cache(maxsize=None)
def runtime_baseline_bytes(model_type: str) -> int:
    """RSS of a fresh process after it imported what a run imports (torch, transformers,
    accelerate, the engine and the ``model_type`` modelling code): what a CPU run holds
    besides its tensors."""
    code = ("import json, torch, transformers, accelerate, lowmem.build, lowmem.memory as m;"
            "from transformers import AutoConfig, AutoModelForCausalLM;"
            f"AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model({model_type!r}))];"
            "print(json.dumps(m.current_rss_bytes()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def _zo2_parts(recipe: Recipe, config, parts: dict[str, int]) -> dict[str, int]:
    """Device parts of a ZO2 step: resident weights, transfer buffers, dual-forward activations."""
    from lowmem.optim.targets import block_container

    with FakeTensorMode(allow_non_fake_inputs=True):
        _, blocks = block_container(_fake_model(recipe.model, config))
        largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        in_blocks = sum(p.numel() for p in blocks.parameters())
    host_dtype = getattr(torch, recipe.offload.host_dtype or recipe.model.dtype)
    weights = parts["weights"] - in_blocks * getattr(torch, recipe.model.dtype).itemsize
    buffers = (recipe.offload.prefetch_depth + 1) * largest * host_dtype.itemsize
    return {**parts, "weights": weights, "transfer_buffers": buffers}


def plan(recipe: Recipe, device: str = "cpu", device_memory_gb: float | None = None,
         suggest: bool = True, forward_only: bool = False) -> Plan:
    """Predict the peak of one training step of ``recipe`` on ``device`` ("cpu": peak RSS,
    "cuda": peak allocated), or of one no-grad forward. With ``device_memory_gb``, say whether
    it fits and, if not, which changes make it fit (with their predicted peaks)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: must be cpu or cuda, got {device!r}")
    if device_memory_gb is not None and device_memory_gb <= 0:
        raise ValueError(f"train.device_memory_gb: must be > 0, got {device_memory_gb}")
    config = model_config(recipe.model)
    offloaded = recipe.offload.enabled and device == "cuda"
    parts, totals = trace_step(recipe, config, 2 if offloaded else 1, forward_only, device)
    if offloaded:
        parts = _zo2_parts(recipe, config, parts)
    parts["runtime"] = runtime_baseline_bytes(config.model_type) if device == "cpu" else 0
    capacity = None if device_memory_gb is None else int(device_memory_gb * 2**30)
    result = Plan(device=device, parts=parts, totals=totals, capacity_bytes=capacity)
    if suggest and not result.fits:
        result.suggestions = suggestions(recipe, device, capacity)
    return result


# (label, overrides): the changes tried, alone and combined, for a recipe that does not fit
CHANGES = [
    ("APOLLO-Mini", ["optim.name=apollo_mini", "optim.args={}"]),
    ("8-bit AdamW, 8-bit embedding state", ["optim.name=adamw8bit", "optim.args={fp32_state_params: []}"]),
    ("layer-wise updates", ["optim.layerwise=true", "optim.max_grad_norm=null"]),
    ("gradient checkpointing", ["model.gradient_checkpointing=true", "activations.wta_crs=null"]),
    ("WTA-CRS keep 0.3", ["activations.wta_crs={keep_ratio: 0.3}", "model.gradient_checkpointing=false"]),
    ("APOLLO-Mini + layer-wise + checkpointing",
     ["optim.name=apollo_mini", "optim.args={}", "optim.layerwise=true", "optim.max_grad_norm=null",
      "model.gradient_checkpointing=true", "activations.wta_crs=null"]),
    ("8-bit AdamW (8-bit embedding) + layer-wise + checkpointing",
     ["optim.name=adamw8bit", "optim.args={fp32_state_params: []}", "optim.layerwise=true",
      "optim.max_grad_norm=null", "model.gradient_checkpointing=true", "activations.wta_crs=null"]),
    ("MeZO (zeroth order)", ["optim.name=mezo", "optim.args={}", "optim.layerwise=false", "train.grad_accum=1"]),
    ("ZO2 (MeZO, blocks offloaded to the host)",
     ["optim.name=mezo", "optim.args={}", "optim.layerwise=false", "train.grad_accum=1", "offload.enabled=true"]),
]


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    from lowmem.recipe import apply_overrides, recipe_from_dict

    return recipe_from_dict(apply_overrides(recipe.model_dump(), list(overrides)), "suggestion")


def suggestions(recipe: Recipe, device: str, capacity: int | None) -> list[tuple[str, list[str], int]]:
    """Each change of :data:`CHANGES` that applies, with its predicted peak, smallest first
    (ZO2 only on a GPU: on the CPU the host is the device)."""
    found = []
    for label, overrides in CHANGES:
        if "offload.enabled=true" in overrides and device != "cuda":
            continue
        try:
            changed = plan(with_overrides(recipe, overrides), device, suggest=False)
        except ValueError:  # the change does not combine with this recipe (e.g. grad_accum with ZO)
            continue
        found.append((label, overrides, changed.peak_bytes))
    return sorted(found, key=lambda item: item[2])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(p: Plan) -> str:
    """The plan as text: parts at the peak, totals, verdict, suggestions."""
    what = "peak RSS" if p.device == "cpu" else "peak CUDA memory"
    lines = [f"memory plan ({p.device}): predicted {what} {_gib(p.peak_bytes)}"]
    lines += [f"  {name:<18} {_gib(n):>12}" for name, n in p.parts.items() if n]
    lines.append("  totals: " + ", ".join(f"{k} {_gib(v)}" for k, v in p.totals.items()))
    if p.capacity_bytes is not None:
        lines.append(f"  fits in {_gib(p.capacity_bytes)}: {'yes' if p.fits else 'NO'}")
    for label, overrides, peak in p.suggestions:
        mark = "fits" if p.capacity_bytes is None or peak <= p.capacity_bytes else "too big"
        lines.append(f"  - {label}: {_gib(peak)} ({mark}): {' '.join(overrides)}")
    return "\n".join(lines)


def refusal(p: Plan) -> str:
    """One line saying why a run that does not fit is not started, and what would fit."""
    fitting = [s for s in p.suggestions if s[2] <= p.capacity_bytes]
    hint = f"; {fitting[0][0]} would need {_gib(fitting[0][2])} ({' '.join(fitting[0][1])})" if fitting else ""
    return (f"train.device_memory_gb: predicted peak {_gib(p.peak_bytes)} exceeds {_gib(p.capacity_bytes)} "
            f"on {p.device}{hint}; pass --force to run anyway")
