"""Build a model whose decoder blocks stay unmaterialised until the offload engine stores them, one at a time.

A streamed model is a Hugging Face causal LM whose *units* (embeddings, final norm, ``lm_head``: every
parameter outside the decoder blocks, :func:`lowmem.structure.block_container`) hold their real values
and whose blocks' parameters are on the ``meta`` device. A :class:`BlockFiller` attached to it
(:func:`attach_filler`, read back by :func:`block_filler`) gives one block its values on the CPU when
asked (:meth:`BlockFiller.fill`); :class:`lowmem.offload.streamed.StreamedModel` asks block by block,
packs the block into its tier and drops it before the next, so the host never holds more than the
units and one block (issue 25; ZeRO-Infinity, Rajbhandari et al., 2021, §5: the model is built
straight into the offloaded partitions; Fuyou, Liao et al., 2024, §4: NVMe holds what RAM cannot).

Values are those of the in-memory build, bit for bit. A config-built model (:func:`build_streamed`):
``torch.manual_seed(seed); AutoModelForCausalLM.from_config(config)`` draws every parameter's values from
the global generator, first in the constructors (``reset_parameters``), then in transformers'
``_init_weights`` visited children-first (``initialize_weights``). Here the same ``from_config`` runs with
the parameters on ``meta`` (accelerate's ``init_empty_weights``, buffers real) under :class:`ScratchDraws`,
which runs every seeded random op on a meta tensor again on a scratch CPU tensor of the same
shape, strides and dtype and discards it: the generator advances exactly as in memory, one tensor at a
time. Each module's ``_init_weights`` call is recorded with the generator state it started from; filling a
block replays its modules' calls (children first) from those states, on fp32 (the construction dtype)
CPU tensors, then casts to the model's dtype, as ``.to(dtype)`` after the in-memory build does. Tied
weights (``all_tied_weights_keys``: target <- source) take the source's values: during a replay the
target draws into a scratch tensor, as in memory, where the tie is made after initialisation.
Pretrained weights come from :mod:`lowmem.block_loading` through the same interface.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.structure import block_container

_FILLER = "lowmem_block_filler"  # the attribute of a streamed model that holds its BlockFiller


class BlockFiller:
    """Gives the parameters of a streamed model's modules their values on the CPU, module by module."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.names = {id(m): name for name, m in model.named_modules()}

    def fill(self, block: nn.Module) -> None:
        """Give the parameters of ``block`` and its submodules that are still on ``meta`` their values (see
        :meth:`fill_modules`); a block filled before is left as it is."""
        waiting = [m for m in block.modules() if any(p.is_meta for p in m.parameters(recurse=False))]
        if waiting:
            self.fill_modules(waiting)

    def fill_modules(self, modules: list[nn.Module]) -> None:
        """Give the own parameters of ``modules`` (on ``meta``) their values on the CPU in ``self.dtype``, in
        place: the ``Parameter`` objects stay the same (an optimizer built on the streamed model holds them)."""
        raise NotImplementedError


def attach_filler(model: nn.Module, filler: BlockFiller) -> None:
    object.__setattr__(model, _FILLER, filler)  # not a submodule, not a state entry


def block_filler(model: nn.Module) -> BlockFiller | None:
    """The filler of a streamed model (None: every parameter of ``model`` is materialised)."""
    return getattr(model, _FILLER, None)


def materialise_as(p: nn.Parameter, value: torch.Tensor) -> None:
    """Make the ``meta`` parameter ``p`` hold ``value`` (CPU), as the same Python object (``set_data`` cannot
    cross from ``meta``; the objects' contents are swapped instead)."""
    torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))


class ScratchDraws(TorchDispatchMode):
    """Runs each seeded random op (``torch.Tag.nondeterministic_seeded``: ``normal_``, ``uniform_``,
    ``randn``, ...) that touches a ``meta`` tensor once more on scratch CPU tensors of the same shape,
    strides and dtype, so the CPU generator advances as if the meta tensors were real; the meta op itself
    runs as usual. The scratch tensors share one reused buffer (the largest tensor's bytes): freeing and
    allocating one per parameter would leave the host heap holding them (glibc keeps freed chunks below its
    mmap threshold)."""

    def __init__(self):
        super().__init__()
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            leaves = pytree.tree_leaves((args, kwargs))
            on_meta = any(isinstance(a, torch.Tensor) and a.is_meta for a in leaves)
            if on_meta or kwargs.get("device") == torch.device("meta"):
                real_args, real_kwargs = pytree.tree_map(self._scratch, (args, kwargs))
                if "device" in real_kwargs:
                    real_kwargs["device"] = torch.device("cpu")
                func(*real_args, **real_kwargs)
        return func(*args, **kwargs)

    def _scratch(self, a):
        if not (isinstance(a, torch.Tensor) and a.is_meta):
            return a
        needed = a.untyped_storage().nbytes()
        if self.buffer.numel() < needed:
            self.buffer = torch.empty(needed, dtype=torch.uint8)
        view = torch.empty(0, dtype=a.dtype)
        return view.set_(self.buffer.untyped_storage(), a.storage_offset(), a.shape, a.stride())


class InitReplay(BlockFiller):
    """The filler of a config-built model: replays each module's recorded ``_init_weights`` call."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, calls: dict[int, tuple],
                 init_dtypes: dict[int, torch.dtype]):
        super().__init__(model, dtype)
        self.calls, self.init_dtypes = calls, init_dtypes  # id(module) -> (order, rng state, owner); id(p) -> dtype
        self.tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # targets: values of their source

    def fill_modules(self, modules: list[nn.Module]) -> None:
        params = list({id(p): p for m in modules for p in m.parameters(recurse=False) if p.is_meta}.values())
        for p in params:
            materialise_as(p, torch.empty(p.shape, dtype=self.init_dtypes[id(p)]))
        self.replay(modules)
        for p in params:
            p.data = p.data.to(self.dtype)

    def replay(self, modules: list[nn.Module]) -> None:
        """The recorded ``_init_weights`` calls of ``modules``, in the recorded order, each from its own
        generator state; the global generator is left as it was."""
        todo = sorted((self.calls[id(m)][0], self.names[id(m)], m) for m in modules if id(m) in self.calls)
        kept = torch.get_rng_state()
        try:
            with torch.no_grad(), _guarded():
                for _, name, m in todo:
                    _, state, owner = self.calls[id(m)]
                    torch.set_rng_state(state)
                    with self._untied(m, name):
                        owner._init_weights(m)
        finally:
            torch.set_rng_state(kept)

    @contextlib.contextmanager
    def _untied(self, module: nn.Module, name: str):
        """Tie targets of ``module`` swapped for scratch parameters while it initialises."""
        held = {k: p for k, p in module._parameters.items()
                if p is not None and (f"{name}.{k}" if name else k) in self.tied}
        for k, p in held.items():
            module._parameters[k] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        try:
            yield
        finally:
            module._parameters.update(held)


def _guarded():
    """transformers' ``initialize_weights`` context: its init functions in place of ``torch.nn.init``'s."""
    from transformers import initialization

    return initialization.guard_torch_init_functions()


def _replayable(cls: type) -> bool:
    """Whether models of ``cls`` initialise their weights through ``PreTrainedModel._initialize_weights``, the
    calls that :func:`build_streamed` records and :class:`InitReplay` replays."""
    from transformers.modeling_utils import PreTrainedModel

    return cls._initialize_weights is PreTrainedModel._initialize_weights


def build_streamed(config, seed: int, dtype: torch.dtype) -> nn.Module:
    """The model ``torch.manual_seed(seed); AutoModelForCausalLM.from_config(config).to(dtype)`` builds, with
    its blocks left on ``meta`` and an :class:`InitReplay` attached; the global generator ends where the
    in-memory build leaves it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import PreTrainedModel

    calls: dict[int, tuple] = {}
    original = PreTrainedModel._initialize_weights

    def record(owner, module, is_custom_code=False):
        if not getattr(module, "_is_hf_initialized", False):
            calls[id(module)] = (len(calls), torch.get_rng_state(), owner)
        return original(owner, module, is_custom_code)

    torch.manual_seed(seed)
    with mock.patch.object(PreTrainedModel, "_initialize_weights", record), \
            init_empty_weights(include_buffers=False), ScratchDraws():
        model = AutoModelForCausalLM.from_config(config)
    if not _replayable(type(model)):
        raise ValueError(f"model.config: {type(model).__name__} initialises its weights its own way; "
                         "build it in memory (offload.enabled: false)")
    filler = InitReplay(model, dtype, calls, {id(p): p.dtype for p in model.parameters()})
    fill_units(model, filler)
    attach_filler(model, filler)
    return model.to(dtype)


def build_in_memory(config, seed: int, dtype: torch.dtype) -> nn.Module:
    """``torch.manual_seed(seed); AutoModelForCausalLM.from_config(config).to(dtype)``, bit for bit. In a
    dtype narrower than fp32 it is built streamed and its blocks filled one after another, so the host holds
    the weights in ``dtype`` and one block in fp32, never every weight in fp32 first (twice the bf16
    model); a model that initialises its weights its own way is built as written."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping  # from_config's own choice of class
    if dtype.itemsize >= 4 or type(config) not in mapping or not _replayable(mapping[type(config)]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).to(dtype)
    model = build_streamed(config, seed, dtype)
    found = block_container(model)
    for block in found[1] if found else []:
        block_filler(model).fill(block)
    object.__delattr__(model, _FILLER)
    return model


def fill_units(model: nn.Module, filler: BlockFiller) -> None:
    """Fill every module outside the decoder blocks (they stay resident), then re-tie the tied weights."""
    found = block_container(model)
    blocks = {id(m) for b in (found[1] if found else []) for m in b.modules()}
    filler.fill_modules([m for m in model.modules() if id(m) not in blocks])
    model.tie_weights()
