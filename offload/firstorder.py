"""First-order fine-tuning with the decoder blocks, their master weights and their optimizer
state offloaded to host RAM and NVMe (Fuyou: Liao et al., 2024, "Adding NVMe SSDs to Enable
and Accelerate 100B Model Fine-tuning on a Single GPU", arXiv 2403.06504, §4; renamed LoHan
/ Ratel, ICDE 2025; artifact Crispig/Ratel).

Placement: fp32 master weights of every block in a :class:`~lowmem.offload.store.BlockStore`
(host RAM up to ``offload.host_memory_budget_gb``, checksummed files under ``offload.nvme_dir``
beyond it), the block's optimizer state in host RAM while the budget left covers it, else in
files (:mod:`lowmem.offload.fo_state`); embeddings, final norm and ``lm_head`` on the device, or,
when large, with master and state placed as the blocks' (:mod:`lowmem.offload.fo_resident`). The
device holds compute copies of ``prefetch_depth + 1`` blocks at most (mover slots: the one
computing and the ones prefetched; nothing is written back from the device).

One step on ``grad_accum`` micro-batches (N blocks; :mod:`lowmem.offload.fo_driver` cuts the graph)::

    for each micro-batch m (loss scaled by 1/grad_accum):
        forward : upload blocks 0..N-1 ahead of use, run each without autograd, keep its input x_k
                  (on the device, or swapped to the host: fo_swap.py decides from measurements)
        loss.backward()                         # head gradients, dL/dh_{N-1}
        for k = N-1 .. 0:                       # blocks uploaded again, in reverse
            recompute block k from x_k, backprop dL/dh_k -> block grads G_k, dL/dx_k
            G_k -> host; dL/dx_k -> dL/dh_{k-1} (or the embeddings)
            host worker (fo_host.py): A_k += G_k; on the last micro-batch read master W_k and
                state S_k (RAM or NVMe), W_k, S_k <- opt(W_k, A_k, S_k), write them back
    barrier (every block stepped and written) ; step the parameters outside the blocks

This is Fuyou's synchronous out-of-core CPU optimizer: step t is complete before the
forward of step t+1 reads the masters (no stale weights). Each parameter is stepped alone
with its gradient by :func:`lowmem.optim.step_one.step_one`, as in-memory layer-wise
training does, so the same rules hold: no global gradient clipping, a parameter whose
(accumulated) gradient holds NaN/Inf is not updated (and the step is reported as non-finite).
With a CPU "device" the lanes are no-ops and, in fp32, training equals in-memory layer-wise
training with the same ``grad_accum`` bit for bit.

Contract with the trainer::

    engine = FirstOrderEngine(model, optimizer, recipe.offload)   # OffloadSection; model on CPU
    loss, nonfinite = engine.step([lambda: loss_fn(model, b) for b in micro_batches], autocast)
    # one optimizer step; a single callable is one micro-batch; loss: the mean over micro-batches
    engine.eval_loss(batch)                       # model(**batch) streams the blocks too
    with engine.full_state(): optimizer.state_dict()   # every block's state in memory meanwhile
    engine.model_state_dict() / load_model_state_dict(sd) / state_dict() / load_state_dict(sd)
    engine.close()                                # blocks back into the model (CPU), hooks removed
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lowmem.dtypes import MASTER_DTYPE
from lowmem.offload.base import StreamedEngine
from lowmem.offload.fo_checkpoint import StreamedState
from lowmem.offload.fo_driver import BlockDriver
from lowmem.offload.fo_host import CpuOptimizer, HostStepper
from lowmem.offload.fo_resident import ResidentTier, offloaded_params
from lowmem.offload.fo_state import StateTier
from lowmem.offload.fo_swap import BlockTimer, Profile, swap_count, take_profile
from lowmem.offload.settings import OffloadSection
from lowmem.optim.registry import is_zeroth_order
from lowmem.optim.step_one import all_finite, step_one, steps_by_rows


def _check_optimizer(optimizer) -> None:
    if is_zeroth_order(optimizer):
        raise ValueError("optim.name: a zeroth-order optimizer offloads with the ZO2 engine, not the first-order one")
    if getattr(optimizer, "steps_in_backward", False):  # a lowmem.steps.layerwise.LayerwiseOptimizer
        raise ValueError("optim.layerwise: give the offload engine the plain optimizer (it is layer-wise itself)")


def _check_trainable(blocks: nn.ModuleList, group_of: dict) -> None:
    if any(not p.requires_grad or id(p) not in group_of for p in blocks.parameters()):
        raise ValueError("model: every block parameter must be trainable and in the optimizer "
                         "(model.trainable / model.lora are not supported with offload)")


def _budget_left(budget: float | None, used: int) -> float | None:
    """The host budget left after ``used`` bytes of it (None: no budget)."""
    return None if budget is None else max(0.0, budget - used)


class FirstOrderEngine(StreamedEngine):
    """First-order steps on ``model`` with its blocks offloaded; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer, config: OffloadSection | dict | None = None,
                 device: torch.device | str | None = None, device_budget_gb: float | None = None):
        _check_optimizer(optimizer)
        super().__init__(model, optimizer, config, device)
        config = self.config
        self.device_budget = None if device_budget_gb is None else device_budget_gb * 2**30
        self.group_of = {id(p): n for n, g in enumerate(optimizer.param_groups) for p in g["params"]}
        _check_trainable(self.blocks, self.group_of)
        # nothing is written back from the device (a block's update happens on the host): no draining slot
        self._stream(MASTER_DTYPE, MASTER_DTYPE, write_back=False)
        self.budget = None if config.host_memory_budget_gb is None else config.host_memory_budget_gb * 2**30
        self.driver = BlockDriver(model, self.device, self.mover)
        resident = list({id(p): p for _, m in self.units for p in m.parameters()}.values())
        big = offloaded_params(config.offload_embeddings, resident, self.packed)
        self.resident = [p for p in resident if all(p is not q for q in big)]
        self.big_params = big
        # the placement order: blocks' masters, the large parameters' masters, then the states
        chunk = max(pk.numel for pk in self.packed) if steps_by_rows(optimizer) else None  # their step's unit
        self.big = (ResidentTier(big, _budget_left(self.budget, self.store.ram_bytes), config.nvme_dir,
                                 len(self.packed), chunk) if big else None)
        self.states = StateTier(optimizer, [pk.params for pk in self.packed] + [[p] for p in big],
                                self._state_budget(), config.nvme_dir,
                                chunks=self.big.state_chunks() if big else None)
        self.checkpoint_state = StreamedState(optimizer, self.states)  # a checkpoint's state, block by block
        self.cpu = CpuOptimizer(optimizer, self.group_of, self.states)
        self.host = HostStepper(self.packed, self.store, self.mover.lanes, self.cpu, config.prefetch_depth,
                                pin=self.device.type == "cuda")
        self.profile: Profile | None = None
        self._held: dict[int, torch.Tensor] = {}  # while loading_state: the offloaded embeddings' own data

    def _state_budget(self) -> float | None:
        """The host budget left for optimizer states after the masters on the host."""
        return _budget_left(self.budget, self.store.ram_bytes + (self.big.host_bytes if self.big else 0))

    # ---- one step ------------------------------------------------------------------
    def step(self, closures, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, bool]:
        """One optimizer step over ``closures`` (one per micro-batch, each returns its loss; a
        single callable is one). Returns (mean loss, nonfinite); a non-finite loss updates nothing."""
        closures = [closures] if callable(closures) else list(closures)
        self.driver.swap = swap_count(self.config.swap_activations, len(self.packed), self.profile,
                                      self.device.type, self.device_budget)
        profiling = self.profile is None and self.config.swap_activations == "auto"
        losses, nonfinite = [], False
        for m, closure in enumerate(closures):
            loss = self._forward(closure, autocast, timed=profiling and m == 0)
            if not torch.isfinite(loss.detach()).all():
                self._abort()
                return loss.detach(), True
            losses.append(loss.detach())
            nonfinite |= self._backward(loss, len(closures), autocast, last=m == len(closures) - 1)
        nonfinite |= self.host.barrier()
        self._step_resident()
        self.steps += 1
        if len(losses) == 1:
            return losses[0], nonfinite
        return torch.tensor(sum(float(x) / len(losses) for x in losses), dtype=torch.float64), nonfinite

    def _forward(self, closure, autocast, timed: bool) -> torch.Tensor:
        self.driver.recording = True
        self.driver.timer = BlockTimer(self.device) if timed else None
        if timed and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with autocast():
                return closure()
        except BaseException:
            self._abort()
            raise
        finally:
            self.driver.recording = False

    def _backward(self, loss: torch.Tensor, micro_batches: int, autocast, last: bool) -> bool:
        """Backward of one micro-batch; gradients outside the blocks summed as autograd would."""
        sums = {id(p): p.grad for p in self.resident + self.big_params}
        for p in self.resident + self.big_params:
            p.grad = None
        try:
            (loss if micro_batches == 1 else loss / micro_batches).backward()
            self._blocks_backward(autocast, last)
        except BaseException:
            self._abort()
            raise
        if self.driver.timer is not None:
            self.profile = take_profile(self.driver, self.device)
        nonfinite = False
        for p in self.resident + self.big_params:
            before, fresh = sums[id(p)], p.grad
            total = fresh if before is None else (before if fresh is None else before.add_(fresh))
            if total is not None and not all_finite(total):  # as optim.layerwise: drop it
                nonfinite, total = True, None
            p.grad = total
        return nonfinite

    def _blocks_backward(self, autocast, last: bool) -> None:
        order = list(reversed(range(len(self.packed))))
        self.mover.begin(order)
        for k in order:
            self.mover.acquire(k)
            try:
                dx = self.driver.backward_block(k, autocast)
                grads = self.host.to_host(k)
            finally:
                self.mover.release(k, write_back=False, version=0, round_seed=0)
            self.driver.propagate(k, dx)
            self.host.submit(k, grads, last, version=self.steps + 1)

    def _step_resident(self) -> None:
        for p in self.resident:
            if p.grad is not None:
                step_one(self.optimizer, self.group_of[id(p)], p)
        if self.big is not None:
            self.big.step(self.cpu, self.steps + 1)

    def barrier(self) -> bool:
        """Wait for every block step in flight; True if one dropped a non-finite gradient."""
        return self.host.barrier()

    def _abort(self) -> None:
        self.mover.abort()
        self.driver.forget()
        try:
            self.host.abort()
        finally:
            for p in self.resident + self.big_params + [p for pk in self.packed for p in pk.params]:
                p.grad = None

    # ---- state -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _params_on_host(self):
        """Parameters whose state lives on the host point at empty CPU fp32 tensors meanwhile, so that
        loading the optimizer puts their state there (torch moves state to its parameter's device)."""
        self._held = {id(p): p.data for p in self.big_params}  # their weights, for a load meanwhile
        for p in [p for pk in self.packed for p in pk.params] + self.big_params:
            p.data = torch.empty(0, dtype=MASTER_DTYPE)
        try:
            yield
        finally:
            for i in range(len(self.packed)):
                self.mover.unbind(i)
            for p in self.big_params:
                p.data = self._held[id(p)]
            self._held = {}

    @contextlib.contextmanager
    def full_state(self):
        """Every block's optimizer state in ``optimizer.state`` (read from NVMe) meanwhile."""
        self.barrier()
        off_ram = self.states.off_ram()
        try:
            for k in off_ram:
                self.states.load(k)
            yield self.optimizer
        finally:
            for k in off_ram:
                self.states.evict(k)

    @contextlib.contextmanager
    def loading_state(self):
        """Load the optimizer's state inside (e.g. from a checkpoint); it is placed again on exit."""
        self.barrier()
        with self._params_on_host():
            yield self.optimizer
        self.states.reset(self._state_budget(), self.steps, fill=self.checkpoint_state.fill)

    def _optimizer_state(self) -> dict:
        """A copy of the optimizer's full state (blocks' states read from NVMe)."""
        with self.full_state():
            opt = self.optimizer.state_dict()
            return {"state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                              for i, s in opt["state"].items()}, "param_groups": opt["param_groups"]}

    def _load_optimizer_state(self, state: dict) -> None:
        with self.loading_state():
            self.optimizer.load_state_dict(state)

    def _masters(self) -> dict:
        return self.big.masters() if self.big is not None else {}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state on the CPU; block (and offloaded embedding) weights are the fp32 masters."""
        out = super().model_state_dict()
        masters = self._masters()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in masters:
                out[name] = masters[id(t)].clone()
        return out

    def load_model_state_dict(self, state, partial: bool = False) -> None:
        """Load weights saved by :meth:`model_state_dict` (blocks go to the store as masters, one at a time)."""
        super().load_model_state_dict(state, partial, skip={id(p) for p in self.big_params})
        if self.big is not None:  # their masters, and their device copies (their own data, even while loading)
            names = {id(t): n for n, t in self.model.state_dict(keep_vars=True).items()}
            held = [(p, p.data) for p in self.big_params if id(p) in self._held]
            for p, _ in held:
                p.data = self._held[id(p)]
            try:
                self.big.load([state[names[id(p)]] for p in self.big_params], self.steps)
            finally:
                for p, data in held:
                    p.data = data

    def close(self, restore: bool = True) -> None:
        """Wait for the last step, give the blocks' weights back to the model (CPU, training dtype; not with
        ``restore=False``), remove the overrides. The NVMe tier's optimizer state is not read back."""
        super().close(restore)
        self.host.close()
        if self.big is not None:
            self.big.close()
