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

import torch

from lowmem.dtypes import MASTER_DTYPE
from lowmem.offload.streams import HostMemory, host_wait
from lowmem.optim.step_one import all_finite, step_one


class HostStepper:
    """Gradient buffers, accumulation and the per-block CPU step of a :class:`FirstOrderEngine`."""

    def __init__(self, engine, depth: int):
        self.engine = engine
        self.memory = HostMemory(engine.device.type == "cuda")  # exact-size page-locked, released on close
        self.free: queue.Queue = queue.Queue()
        biggest = max(pk.numel for pk in engine.packed)
        for _ in range(depth + 1):
            self.free.put(self.memory.empty(biggest, MASTER_DTYPE))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmem-cpu-step")
        self.in_flight: list[Future] = []
        self.accum: dict[int, list[torch.Tensor | None]] = {}  # block -> summed gradients so far

    def to_host(self, k: int) -> tuple:
        """Queue the copy of block ``k``'s gradients into a free host buffer (offload lane)."""
        eng = self.engine
        buf = self.free.get()  # back-pressure: at most prefetch_depth + 1 blocks wait for the CPU
        lanes = eng.mover.lanes
        has = []
        with lanes.offload.use():
            lanes.offload.wait(lanes.compute.record())
            for p, view in zip(eng.packed[k].params, eng.packed[k].views(buf)):
                has.append(p.grad is not None)
                if p.grad is not None:
                    view.copy_(p.grad.view(view.shape), non_blocking=True)
                    if lanes.offload.stream is not None:
                        p.grad.record_stream(lanes.offload.stream)
                    p.grad = None
            copied = lanes.offload.record()
        return buf, copied, has

    def submit(self, k: int, grads: tuple, last: bool) -> None:
        """The worker's part on block ``k``'s gradients (:meth:`to_host`); the block is released by now,
        so that nothing on the device side rebinds its parameters while the worker steps them."""
        self.in_flight.append(self.worker.submit(self._work, k, *grads, last))

    def _work(self, k: int, buf: torch.Tensor, copied, has: list[bool], last: bool) -> bool:
        """On the worker: add the micro-batch's gradients; on the last one step the block."""
        try:
            host_wait(copied)
            grads, nonfinite = self._accumulate(k, buf, has, last)
            if last:
                self._step(k, grads)
            else:
                self.accum[k] = grads
            return nonfinite
        finally:
            self.free.put(buf)

    def _accumulate(self, k: int, buf: torch.Tensor, has: list[bool], last: bool):
        sums = self.accum.pop(k, None) or [None] * len(has)
        nonfinite = False
        for j, (g, got) in enumerate(zip(self.engine.packed[k].views(buf), has)):
            if not got:
                continue
            total = g if sums[j] is None else sums[j].add_(g)  # A + G, as autograd accumulates .grad
            if not all_finite(total):  # as optim.layerwise: drop this gradient (so far)
                nonfinite, total = True, None
            elif total is g and not last:  # the buffer is reused: keep a copy across micro-batches
                total = g.clone()
            sums[j] = total
        return sums, nonfinite

    def _step(self, k: int, grads: list[torch.Tensor | None]) -> None:
        eng = self.engine
        nvme = eng.store.tiers[k] == "nvme"
        master = eng.store.get(k) if nvme else eng.store.fetch(k).result().tensor
        eng.states.load(k)
        pk = eng.packed[k]
        for p, w, g in zip(pk.params, pk.views(master), grads):
            if g is not None:
                p.data, p.grad = w, g
                step_one(eng.optimizer, eng.group_of[id(p)], p)
        eng.mover.unbind(k)
        version = eng.steps + 1
        if nvme:
            eng.store.put(k, master, version=version)
        eng.states.save(k, version)

    def barrier(self) -> bool:
        """Wait for every block's work in flight; True if one dropped a non-finite gradient."""
        done, self.in_flight = self.in_flight, []
        nonfinite, errors = False, []
        for future in done:  # every one, so that no step is still running when an error is raised
            try:
                nonfinite |= future.result()
            except Exception as err:  # noqa: BLE001 -- the first is raised below
                errors.append(err)
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
