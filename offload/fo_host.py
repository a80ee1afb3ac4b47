"""The CPU side of first-order offload: gradients to the host, accumulation, each block's step.

Fuyou (Liao et al., 2024, arXiv 2403.06504, §4, "synchronous out-of-core CPU optimizer") steps
the optimizer on the CPU while the GPU runs the backward of the blocks before it. Here, for
block ``k`` whose gradients ``G_k`` exist on the device::

    G_k -> a free pinned host buffer (offload lane; back-pressure: prefetch_depth + 1 buffers)
    worker thread:  A_k <- G_k  (first micro-batch)  or  A_k <- A_k + G_k  (grad_accum > 1)
                    a parameter whose accumulated gradient holds NaN/Inf drops it (reported)
                    on the last micro-batch: read master W_k and state S_k (RAM or NVMe),
                    W_k, S_k <- opt(W_k, A_k, S_k) per parameter, write them back

``barrier()`` waits for every block's work before the masters are read again. This is the
layer-wise rule of :class:`lowmem.steps.layerwise.LayerwiseOptimizer` (GaLore, Zhao et al.,
2024, §4.3): a parameter is stepped alone with its gradient summed over the step's
micro-batches in order (``A + G`` as autograd accumulates ``.grad``), after a NaN/Inf check of
the sum after each micro-batch, by :func:`lowmem.optim.step_one.step_one`. So in fp32 the result
equals in-memory layer-wise training with the same ``grad_accum`` bit for bit. With
``grad_accum > 1`` each block's accumulated gradient (fp32, one block's parameters) stays in host
RAM between micro-batches (Fuyou's pitfall: only the last micro-batch's backward overlaps the step).
"""

from __future__ import annotations

import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lowmem.dtypes import MASTER_DTYPE
from lowmem.offload.fo_state import StateTier
from lowmem.offload.store import BlockStore
from lowmem.offload.streams import HostMemory, host_wait
from lowmem.offload.transfer import Packed
from lowmem.optim.step_one import all_finite, step_one

@dataclass
class CpuOptimizer:
    """The optimizer run on the host over the masters, with where each parameter's group and each
    stored unit's state are (``group_of``: id(parameter) -> group index; ``states``: the engine's
    :class:`~lowmem.offload.fo_state.StateTier`)."""

    optimizer: torch.optim.Optimizer
    group_of: dict[int, int]
    states: StateTier

    def step_stored(self, store: BlockStore, i: int, packed: Packed, grads, state_k: int, version: int,
                    refresh: bool = False) -> None:
        """Step what entry ``i`` of ``store`` holds (packed as ``packed``): read its master W and the
        state S of entry ``state_k`` (RAM or NVMe), step each parameter that has a gradient (``grads``,
        in the order of ``packed.params``; None: no gradient) alone on its view of W
        (:func:`step_one`), write W and S back as ``version``. Each parameter keeps its own
        ``.data`` (the device copy, or the placeholder of a block not resident), which takes the
        new value when ``refresh``."""
        master = store.edit(i)
        self.states.load(state_k)
        for p, w, g in zip(packed.params, packed.views(master), grads):
            if g is None:
                continue
            own = p.data
            p.data, p.grad = w, g
            try:
                step_one(self.optimizer, self.group_of[id(p)], p)
            finally:
                p.data = own
            if refresh:
                with torch.no_grad():
                    own.copy_(w)
        store.edited(i, master, version)
        self.states.save(state_k, version)


    def step_chunk(self, p: torch.Tensor, master: torch.Tensor, grad: torch.Tensor, state_k: int, c: int,
                   version: int) -> None:
        """Step rows ``c`` of ``p`` alone (:func:`step_one`): ``master`` (their fp32 master, updated in place)
        with ``grad`` (their gradient) and the chunk's state of chunked entry ``state_k``
        (:meth:`StateTier.chunk`), which is handed back as ``version``. ``p`` keeps its own ``.data`` and
        its whole state in ``optimizer.state`` (the chunk's stands in for it meanwhile)."""
        chunk = self.states.chunk(state_k, c)
        own, whole = p.data, self.optimizer.state.pop(p, None)
        self.optimizer.state[p] = chunk
        p.data, p.grad = master, grad
        try:
            step_one(self.optimizer, self.group_of[id(p)], p)
        finally:
            p.data, stepped = own, self.optimizer.state.pop(p)
            if whole is not None:
                self.optimizer.state[p] = whole
        self.states.chunk_stepped(state_k, c, stepped, version)


class HostStepper:
    """Gradient buffers, accumulation and the per-block CPU step of a :class:`FirstOrderEngine`:
    block ``k``'s gradients come from ``packed[k].params`` on the device (``lanes``), its master is
    entry ``k`` of ``store`` and its state entry ``k`` of ``cpu.states``."""

    def __init__(self, packed: list[Packed], store: BlockStore, lanes, cpu: CpuOptimizer, depth: int, pin: bool):
        self.packed, self.store, self.lanes, self.cpu = packed, store, lanes, cpu
        self.memory = HostMemory(pin)  # exact-size page-locked (pin), released on close
        self.free: queue.Queue = queue.Queue()
        biggest = max(pk.numel for pk in packed)
        for _ in range(depth + 1):
            self.free.put(self.memory.empty(biggest, MASTER_DTYPE))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmem-cpu-step")
        self.in_flight: list[Future] = []
        self.accum: dict[int, list[torch.Tensor | None]] = {}  # block -> summed gradients so far
        self.failed = False  # a block's work raised in this step: the later blocks' work is skipped

    def to_host(self, k: int) -> tuple:
        """Queue the copy of block ``k``'s gradients into a free host buffer (offload lane)."""
        buf = self.free.get()  # back-pressure: at most prefetch_depth + 1 blocks wait for the CPU
        lanes = self.lanes
        has = []
        with lanes.offload.use():
            lanes.offload.wait(lanes.compute.record())
            for p, view in zip(self.packed[k].params, self.packed[k].views(buf)):
                has.append(p.grad is not None)
                if p.grad is not None:
                    view.copy_(p.grad.view(view.shape), non_blocking=True)
                    if lanes.offload.stream is not None:
                        p.grad.record_stream(lanes.offload.stream)
                    p.grad = None
            copied = lanes.offload.record()
        return buf, copied, has

    def submit(self, k: int, grads: tuple, last: bool, version: int) -> None:
        """The worker's part on block ``k``'s gradients (:meth:`to_host`); the block is released by now,
        so that nothing on the device side rebinds its parameters while the worker steps them.
        ``version``: the step the block's master and state hold once stepped."""
        self.in_flight.append(self.worker.submit(self._work, k, *grads, last, version))

    def _work(self, k: int, buf: torch.Tensor, copied, has: list[bool], last: bool, version: int) -> bool:
        """On the worker: add the micro-batch's gradients; on the last one step the block. After a block's
        work has raised (a full disk: its state stays loaded, unwritten), the rest of the step's is skipped,
        so that no further block loads or makes a state that cannot be written (the error is raised at the
        :meth:`barrier`; a 3B run whose disk filled grew to the OOM killer's 24 GiB without this)."""
        try:
            host_wait(copied)
            if self.failed:
                return False
            grads, nonfinite = self._accumulate(k, buf, has, last)
            if last:
                self.cpu.step_stored(self.store, k, self.packed[k], grads, k, version)
            else:
                self.accum[k] = grads
            return nonfinite
        except BaseException:
            self.failed = True
            raise
        finally:
            self.free.put(buf)

    def _accumulate(self, k: int, buf: torch.Tensor, has: list[bool], last: bool):
        sums = self.accum.pop(k, None) or [None] * len(has)
        nonfinite = False
        for j, (g, got) in enumerate(zip(self.packed[k].views(buf), has)):
            if not got:
                continue
            total = g if sums[j] is None else sums[j].add_(g)  # A + G, as autograd accumulates .grad
            if not all_finite(total):  # as optim.layerwise: drop this gradient (so far)
                nonfinite, total = True, None
            elif total is g and not last:  # the buffer is reused: keep a copy across micro-batches
                total = g.clone()
            sums[j] = total
        return sums, nonfinite

    def barrier(self) -> bool:
        """Wait for every block's work in flight; True if one dropped a non-finite gradient."""
        done, self.in_flight = self.in_flight, []
        nonfinite, errors = False, []
        for future in done:  # every one, so that no step is still running when an error is raised
            try:
                nonfinite |= future.result()
            except Exception as err:  # noqa: BLE001 -- the first is raised below
                errors.append(err)
        self.failed = False
        if errors:
            raise errors[0]
        return nonfinite

    def abort(self) -> None:
        """Forget a step cut short: wait for the work in flight, drop the sums."""
        try:
            self.barrier()
        finally:
            self.accum.clear()

    def close(self) -> None:
        self.barrier()
        self.worker.shutdown()
        self.memory.close()
