"""First-order fine-tuning with the decoder blocks, their master weights and their optimizer
state offloaded to host RAM and NVMe (Fuyou: Liao et al., 2024, "Adding NVMe SSDs to Enable
and Accelerate 100B Model Fine-tuning on a Single GPU", arXiv 2403.06504, §4; renamed LoHan
/ Ratel, ICDE 2025; artifact Crispig/Ratel).

Placement: fp32 master weights of every block in a :class:`~lowmem.offload.store.BlockStore`
(host RAM up to ``offload.host_memory_budget_gb``, checksummed files under ``offload.nvme_dir``
beyond it), the block's optimizer state in host RAM while the budget left covers it, else in
files (:mod:`lowmem.offload.fo_state`); embeddings, final norm and ``lm_head`` (with their
state) on the device. The device holds compute copies of ``prefetch_depth + 1`` blocks at
most (:class:`~lowmem.offload.transfer.BlockMover` slots: the one computing and the ones
prefetched; nothing is written back from the device, a block's update happens on the host).

One step on a batch (N blocks; :mod:`lowmem.offload.fo_driver` cuts the graph)::

    forward : upload blocks 0..N-1 ahead of use, run each without autograd, keep its input x_k
    loss.backward()                         # head gradients, dL/dh_{N-1}
    for k = N-1 .. 0:                       # blocks uploaded again, in reverse
        recompute block k from x_k, backprop dL/dh_k -> block grads G_k, dL/dx_k
        G_k -> host (pinned buffer, offload lane); dL/dx_k -> dL/dh_{k-1} (or the embeddings)
        host worker: read master W_k and state S_k (RAM or NVMe), W_k, S_k <- opt(W_k, G_k, S_k)
                     per parameter, write them back           # overlaps the backward of k-1..0
    barrier (every block stepped and written) ; step the resident parameters on the device

This is Fuyou's synchronous out-of-core CPU optimizer: step t is complete before the
forward of step t+1 reads the masters (no stale weights). Each parameter is stepped alone
with its gradient by :func:`lowmem.optim.layerwise.step_one`, as in-memory layer-wise
training does, so the same rules hold: no global gradient clipping, a parameter whose
gradient holds NaN/Inf is not updated (and the step is reported as non-finite), one
micro-batch per step. With a CPU "device" the lanes are no-ops and, in fp32, training
equals in-memory layer-wise training bit for bit.

Contract with the trainer::

    engine = FirstOrderEngine(model, optimizer, recipe.offload)   # OffloadSection; model on CPU
    loss, nonfinite = engine.step(lambda: loss_fn(model, batch), autocast)         # one optimizer step
    engine.eval_loss(batch)                       # model(**batch) streams the blocks too
    with engine.full_state(): optimizer.state_dict()   # every block's state in memory meanwhile
    engine.model_state_dict() / load_model_state_dict(sd) / state_dict() / load_state_dict(sd)
    engine.close()                                # blocks back into the model (CPU), hooks removed
"""

from __future__ import annotations

import contextlib
import queue
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from lowmem.offload.fo_driver import BlockDriver
from lowmem.offload.fo_state import StateTier
from lowmem.offload.streamed import StreamedModel, check_blocks, model_units, offload_section
from lowmem.offload.streams import HostMemory, host_wait
from lowmem.optim.layerwise import LayerwiseOptimizer, step_one
from lowmem.optim.registry import is_zeroth_order
from lowmem.recipe import OffloadSection

MASTER_DTYPE = torch.float32


def _check(optimizer, blocks: nn.ModuleList, units: list, group_of: dict) -> None:
    if is_zeroth_order(optimizer):
        raise ValueError("optim.name: a zeroth-order optimizer offloads with the ZO2 engine, not the first-order one")
    if isinstance(optimizer, LayerwiseOptimizer):
        raise ValueError("optim.layerwise: give the offload engine the plain optimizer (it is layer-wise itself)")
    check_blocks(blocks, units)
    if any(not p.requires_grad or id(p) not in group_of for p in blocks.parameters()):
        raise ValueError("model: every block parameter must be trainable and in the optimizer "
                         "(model.trainable / model.lora are not supported with offload)")


class FirstOrderEngine:
    """First-order steps on ``model`` with its blocks offloaded; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer, config: OffloadSection | dict | None = None,
                 device: torch.device | str | None = None):
        config = offload_section(config)
        self.model, self.optimizer, self.config = model, optimizer, config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.group_of = {id(p): n for n, g in enumerate(optimizer.param_groups) for p in g["params"]}
        blocks, units = model_units(model)
        _check(optimizer, blocks, units, self.group_of)
        # nothing is written back from the device (a block's update happens on the host): no draining slot
        self.streamed = StreamedModel(model, blocks, units, self.device, config, MASTER_DTYPE, MASTER_DTYPE,
                                      slots=config.prefetch_depth + 1)
        self.packed, self.store, self.mover = self.streamed.packed, self.streamed.store, self.streamed.mover
        self.compute_dtype = self.streamed.compute_dtype
        self.budget = None if config.host_memory_budget_gb is None else config.host_memory_budget_gb * 2**30
        self.driver = BlockDriver(model, self.device, self.mover)
        self.resident = list({id(p): p for _, m in units for p in m.parameters()}.values())
        self.states = StateTier(optimizer, [pk.params for pk in self.packed], self._state_budget(),
                                config.nvme_dir)
        pin = self.device.type == "cuda"
        biggest = max(pk.numel for pk in self.packed)
        self.grad_memory = HostMemory(pin)  # exact-size page-locked buffers, released on close
        self.grad_bufs: queue.Queue = queue.Queue()
        for _ in range(config.prefetch_depth + 1):
            self.grad_bufs.put(self.grad_memory.empty(biggest, MASTER_DTYPE))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmem-cpu-step")
        self.steps = 0
        self._steps_in_flight: list[Future] = []

    # ---- set-up --------------------------------------------------------------------
    def _state_budget(self) -> float | None:
        if self.budget is None:
            return None
        on_host = sum(pk.numel for pk, t in zip(self.packed, self.store.tiers) if t == "host")
        return max(0.0, self.budget - on_host * MASTER_DTYPE.itemsize)

    # ---- one step ------------------------------------------------------------------
    def step(self, closure, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, bool]:
        """Forward (``closure()`` returns the loss), streamed backward, every parameter stepped.
        Returns (loss, nonfinite); a non-finite loss updates nothing."""
        self.driver.recording = True
        try:
            with autocast():
                loss = closure()
        except BaseException:
            self._abort()
            raise
        finally:
            self.driver.recording = False
        if not torch.isfinite(loss.detach()).all():
            self._abort()
            return loss.detach(), True
        try:
            loss.backward()
            self._blocks_backward(autocast)
        except BaseException:
            self._abort()
            raise
        nonfinite = self.barrier()
        nonfinite |= self._step_resident()
        self.steps += 1
        return loss.detach(), nonfinite

    def _blocks_backward(self, autocast) -> None:
        order = list(reversed(range(len(self.packed))))
        self.mover.begin(order)
        for k in order:
            self.mover.acquire(k)
            try:
                dx = self.driver.backward_block(k, autocast)
                grads = self._grads_to_host(k)
            finally:
                self.mover.release(k, write_back=False, version=0, round_seed=0)
            self.driver.propagate(k, dx)
            self._steps_in_flight.append(self.worker.submit(self._host_step, k, *grads))

    def _grads_to_host(self, k: int):
        """Queue the copy of block ``k``'s gradients into a free host buffer (offload lane)."""
        buf = self.grad_bufs.get()  # back-pressure: at most prefetch_depth + 1 blocks wait for the CPU step
        lane = self.mover.lanes.offload
        has = []
        with lane.use():
            lane.wait(self.mover.lanes.compute.record())
            for p, view in zip(self.packed[k].params, self.packed[k].views(buf)):
                has.append(p.grad is not None)
                if p.grad is not None:
                    view.copy_(p.grad.view(view.shape), non_blocking=True)
                    if lane.stream is not None:
                        p.grad.record_stream(lane.stream)
                    p.grad = None
            copied = lane.record()
        return buf, copied, has

    def _host_step(self, k: int, buf: torch.Tensor, copied, has: list[bool]) -> bool:
        """On the CPU worker: step block ``k``'s parameters on their master copy; write it back."""
        try:
            host_wait(copied)
            nvme = self.store.tiers[k] == "nvme"
            master = self.store.get(k) if nvme else self.store.fetch(k).result().tensor
            self.states.load(k)
            nonfinite = False
            pk = self.packed[k]
            for p, w, g, got in zip(pk.params, pk.views(master), pk.views(buf), has):
                if not got:
                    continue
                if not torch.isfinite(g).all():  # as optim.layerwise: drop this gradient
                    nonfinite = True
                    continue
                p.data, p.grad = w, g
                step_one(self.optimizer, self.group_of[id(p)], p)
            self.mover.unbind(k)
            version = self.steps + 1
            if nvme:
                self.store.put(k, master, version=version)
            self.states.save(k, version)
            return nonfinite
        finally:
            self.grad_bufs.put(buf)

    def barrier(self) -> bool:
        """Wait for every block step in flight; True if one dropped a non-finite gradient."""
        done, self._steps_in_flight = self._steps_in_flight, []
        nonfinite, errors = False, []
        for future in done:  # every one, so that no step is still running when an error is raised
            try:
                nonfinite |= future.result()
            except Exception as err:  # noqa: BLE001 -- the first is raised below
                errors.append(err)
        if errors:
            raise errors[0]
        return nonfinite

    def _step_resident(self) -> bool:
        nonfinite = False
        for p in self.resident:
            if p.grad is None:
                continue
            if not torch.isfinite(p.grad).all():
                nonfinite, p.grad = True, None
                continue
            step_one(self.optimizer, self.group_of[id(p)], p)
        return nonfinite

    def _abort(self) -> None:
        self.mover.abort()
        self.driver.forget()
        try:
            self.barrier()
        finally:
            for p in list(self.resident) + [p for pk in self.packed for p in pk.params]:
                p.grad = None

    def evaluate(self, metrics_fn, batch: dict) -> dict:
        """``metrics_fn(model, batch)`` (the run's eval metrics) with the current weights, blocks streamed."""
        self.barrier()
        with torch.no_grad():
            return metrics_fn(self.model, {k: v.to(self.device) for k, v in batch.items()})

    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The model's loss on ``batch`` with the current weights (a streamed no-grad forward)."""
        self.barrier()
        with torch.no_grad():
            out = self.model(**{k: v.to(self.device) for k, v in batch.items()}, use_cache=False)
        return out.loss.detach()

    # ---- state -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _params_on_host(self):
        """Block parameters point at empty CPU fp32 tensors meanwhile, so that loading the
        optimizer puts their state on the host (torch moves state to its parameter's device)."""
        for pk in self.packed:
            for p in pk.params:
                p.data = torch.empty(0, dtype=MASTER_DTYPE)
        try:
            yield
        finally:
            for i in range(len(self.packed)):
                self.mover.unbind(i)

    @contextlib.contextmanager
    def full_state(self):
        """Every block's optimizer state in ``optimizer.state`` (read from NVMe) meanwhile."""
        self.barrier()
        on_nvme = [k for k, tier in self.states.tiers.items() if tier == "nvme"]
        try:
            for k in on_nvme:
                self.states.load(k)
            yield self.optimizer
        finally:
            for k in on_nvme:
                self.states.evict(k)

    @contextlib.contextmanager
    def loading_state(self):
        """Load the optimizer's state inside (e.g. from a checkpoint); it is placed again on exit."""
        self.barrier()
        with self._params_on_host():
            yield self.optimizer
        self.states.reset(self._state_budget(), self.steps)

    def state_dict(self) -> dict:
        """Steps and a copy of the optimizer's full state (blocks' states read from NVMe)."""
        with self.full_state():
            opt = self.optimizer.state_dict()
            opt = {"state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                             for i, s in opt["state"].items()}, "param_groups": opt["param_groups"]}
        return {"steps": self.steps, "optimizer": opt}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        with self.loading_state():
            self.optimizer.load_state_dict(state["optimizer"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state on the CPU; block weights are the fp32 masters."""
        self.barrier()
        return self.streamed.model_state_dict(MASTER_DTYPE)

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by :meth:`model_state_dict` (blocks go to the store as masters)."""
        self.barrier()
        self.streamed.load_model_state_dict(state, self.steps)

    def close(self) -> None:
        """Wait for the last step, give the blocks' weights back to the model (CPU, training dtype),
        remove the hooks. The NVMe tier's optimizer state is not read back."""
        self.barrier()
        self.worker.shutdown()
        self.streamed.close()
        self.driver.remove()
        self.grad_memory.close()
