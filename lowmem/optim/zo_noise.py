"""Seeded perturbations shared by every zeroth-order method (MeZO, ZO-AdaMU, ZO2, distributed ZO).

MeZO (Malladi et al., 2023, Algorithm 1) regenerates the perturbation ``z`` from a
seed instead of storing it. The reference reseeds the *global* RNG and walks the
parameters in order, so ``z`` depends on iteration order and on every other
consumer of the global RNG. Here each parameter gets its own seed (:mod:`lowmem.optim.zo_seed`)::

    seed(p) = mix(step_seed, stream, index(p))

and ``z`` is a pure function of ``(kind, seed, shape, device type, dtype)`` and, element by
element, of the element's flat position in the parameter (:mod:`lowmem.optim.zo_keyed`). Hence

* ``z`` for a parameter is identical whichever order parameters are visited in,
  so the ZO2 engine (block by block, on another device copy) draws the very
  same ``z`` as in-memory MeZO -- bit for bit on the same device type;
* the global RNG (dropout, data sampling) is never touched;
* distributed ZO regenerates any rank's perturbation from ``(step_seed, stream)``
  with ``stream = rank * samples_per_rank + sample``;
* a part of a parameter -- an FSDP2 rank's row shard, which carries its place as
  ``noise_span`` (:func:`span`, :mod:`lowmem.optim.zo_shard`) -- is drawn alone and is
  bit for bit its slice of the whole parameter's ``z``: N processes perturb as one does.

Kinds of ``z`` (recipe field ``optim.args.noise``):

``gaussian`` (default)
    ``z ~ N(0, I)`` (MeZO). The parameter is cut into chunks of ``C`` elements
    (``2^15`` on the CPU, ``2^22`` on an accelerator), chunk ``k`` drawn by ``normal_``
    from a private generator seeded with ``mix(seed, k)`` (one chunk: ``seed`` itself),
    on ``torch.get_num_threads()`` threads (torch ops release the GIL); the values do
    not depend on the thread count (:mod:`lowmem.optim.zo_keyed`).
``rademacher``
    ``z_i = +-1`` with probability 1/2 (Spall 1992's SPSA perturbation): one random
    bit per element, 32 per generator call, unpacked through a 256 x 8 table of
    signs. Same chunks and threads. ``E[z z^T] = I``, so ``g z`` is still an
    unbiased estimate of the smoothed gradient's direction (Spall 1992, §III).
``table``
    Slices of one shared table of ``2^25`` normals (128 MiB in fp32, made once per
    process, device and dtype from a fixed seed on the CPU, so identical on every
    device): parameter ``p`` reads ``table[o : o + numel(p)]`` with the offset
    ``o = seed mod (2^25 - numel(p) + 1)``, element ``e`` reads ``table[o + e]`` (OpenAI's evolution strategies,
    Salimans et al. 2017, §2.1 "shared noise table"). No random number is drawn
    per step: a perturbation costs one read of the slice. Each ``z`` is exactly
    N(0, 1) marginally; windows of different parameters (and steps) may overlap,
    so ``E[z_i z_j] = P(i, j read the same entry)`` (about ``1/2^25`` per pair) --
    a random, zero-mean cross term in ``g z`` that averages out over steps, not a
    bias. A parameter larger than the table is read in windows of ``2^24``
    elements at offsets ``mix(seed, k)``. Memory: the table, once per device.
``philox``
    ``z ~ N(0, I)`` from a counter-based generator (Philox4x32-10 and Box-Muller,
    Salmon et al. 2011, as ``tl.randn4x``): ``z_e`` is a pure function of the
    parameter's seed and the element's position ``e`` (:mod:`lowmem.kernels.perturb`).
    On CUDA one Triton kernel per parameter and pass adds ``alpha z`` in place,
    generating ``z`` in registers: no ``z`` buffer, one read and one write of the
    parameter (issue #17); MeZO's update (restore, decay, ``-lr g z``) is one launch
    too. On CPU the PyTorch reference makes the same integers and (to float
    rounding) the same normals, by chunks on the noise threads -- slower than
    ``gaussian`` there; it is the GPU kind.

Arithmetic happens on whole tensors (only the noise is drawn by chunk), so an
update reads as the formula it implements. :meth:`Noise.view` returns ``z`` in a
per-thread scratch buffer (or the table slice) without allocating; it is
read-only and valid until the next ``view`` of the same thread.
"""

from __future__ import annotations

import threading

import torch

from lowmem.kernels import perturb
from lowmem.optim.zo_keyed import (CHUNK, fill_, noise_table, table_fill_,  # noqa: F401 -- re-exported
                                   table_window, threads, tracing)
from lowmem.optim.zo_seed import mix_seed, param_seed  # noqa: F401 -- re-exported with the noise

NOISE_KINDS = ("gaussian", "rademacher", "table", "philox")
_local = threading.local()


def span(like: torch.Tensor) -> tuple[int, int]:
    """``(start, total)``: ``like`` holds the elements ``[start, start + numel)`` of a parameter of
    ``total`` elements (its ``noise_span``, set on an FSDP2 shard by :func:`lowmem.optim.zo_shard.local_shard`);
    ``(0, numel)`` for a whole parameter."""
    return getattr(like, "noise_span", None) or (0, like.numel())


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of ``like.numel()`` elements, reused by this thread (grown when needed). Under fake
    tensors the trace holds its own (dropped with the trace), so the planner counts it live for the
    rest of the step, as it is in a run."""
    from torch._guards import detect_fake_mode

    owner = detect_fake_mode() or _local
    bufs = getattr(owner, "lowmem_noise_scratch", None)
    if bufs is None:
        bufs = {}
        setattr(owner, "lowmem_noise_scratch", bufs)
    key = (like.device, like.dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < like.numel():
        bufs[key] = buf = None  # free the old one before allocating the new
        bufs[key] = buf = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[: like.numel()]


def release_scratch() -> None:
    """Drop this thread's scratch buffers (the fake mode's, under the planner's trace); the next ``view``
    allocates again. Called at the end of an in-memory zeroth-order step (:mod:`lowmem.steps.zeroth_order`):
    kept, the largest parameter's buffer (a 128256 x 1024 bf16 embedding: 250 MiB) stayed resident through
    the eval and the save, which hold no noise; the price is one allocation per step."""
    from torch._guards import detect_fake_mode

    owner = detect_fake_mode() or _local
    if getattr(owner, "lowmem_noise_scratch", None):
        owner.lowmem_noise_scratch = {}


@torch.no_grad()
def restore_decay_step_(tensor: torch.Tensor, z: torch.Tensor, restore: float, decay: float, alpha: float) -> None:
    """``tensor += restore z`` (its own add, so the restored value rounds as the perturbation did),
    ``tensor *= decay``, ``tensor += alpha z``: the rule of :meth:`Noise.update_`, for any ``z``."""
    if restore:
        tensor.add_(z, alpha=restore)
    if decay != 1.0:
        tensor.mul_(decay)
    tensor.add_(z, alpha=alpha)


class Noise:
    """The perturbation ``z(seed)`` of one kind, shaped like a given tensor (``Noise("philox")`` is a
    :class:`PhiloxNoise`)."""

    def __new__(cls, kind: str = "gaussian"):
        return super().__new__(PhiloxNoise if cls is Noise and kind == "philox" else cls)

    def __init__(self, kind: str = "gaussian"):
        if kind not in NOISE_KINDS:
            raise ValueError(f"optim.args.noise: one of {', '.join(NOISE_KINDS)}, got {kind!r}")
        self.kind = kind

    def _into(self, out: torch.Tensor, seed: int, start: int, total: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the ``z`` of a ``total``-element parameter, written into
        the flat ``out`` (:mod:`lowmem.optim.zo_keyed`)."""
        if self.kind == "table":
            return table_fill_(out, seed, start, total)
        return fill_(out, seed, self.kind, start, total)

    def view(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        """Read-only ``z`` of ``like``'s elements (:func:`span`), shaped like it; valid until this thread's
        next ``view``."""
        start, total = span(like)
        window = table_window(seed, start, like.numel(), total, like.device, like.dtype) \
            if self.kind == "table" else None
        z = window if window is not None else self._into(_scratch(like), seed, start, total)
        return z.view(like.shape)

    def draw(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        """A fresh ``z`` of ``like``'s elements (:func:`span`) shaped like it, that the caller may modify."""
        out = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return self._into(out, seed, *span(like)).view(like.shape)

    @torch.no_grad()
    def add_(self, tensor: torch.Tensor, seed: int, alpha: float) -> None:
        """In place: ``tensor += alpha * z(seed)``."""
        tensor.add_(self.view(tensor, seed), alpha=alpha)

    @torch.no_grad()
    def add_view_(self, tensor: torch.Tensor, seed: int, alpha: float) -> torch.Tensor:
        """``tensor += alpha * z(seed)`` with the same arithmetic as :meth:`add_`, and ``z`` as :meth:`view`."""
        z = self.view(tensor, seed)
        tensor.add_(z, alpha=alpha)
        return z

    @torch.no_grad()
    def update_(self, tensor: torch.Tensor, seed: int, restore: float, decay: float, alpha: float) -> None:
        """In place, ``z`` drawn once: ``tensor += restore z`` (its own add), ``tensor *= decay``, ``tensor += alpha z``."""
        restore_decay_step_(tensor, self.view(tensor, seed), restore, decay, alpha)


class PhiloxNoise(Noise):
    """``noise: philox``: Philox normals added in place by the Triton kernel on CUDA (no ``z`` buffer),
    by the chunked PyTorch reference elsewhere (:mod:`lowmem.kernels.perturb`). Under fake tensors
    (the planner's trace) nothing runs: the kernel allocates nothing, and fake values mean nothing."""

    def _into(self, out: torch.Tensor, seed: int, start: int, total: int) -> torch.Tensor:
        if not tracing():
            perturb.write_normal_(out, seed, threads(), start=start)
        return out

    def view(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        return self._into(_scratch(like), seed, *span(like)).view(like.shape)

    @torch.no_grad()
    def add_(self, tensor: torch.Tensor, seed: int, alpha: float) -> None:
        if not tracing():
            perturb.add_(tensor, seed, alpha, threads(), start=span(tensor)[0])

    @torch.no_grad()
    def add_view_(self, tensor: torch.Tensor, seed: int, alpha: float) -> torch.Tensor:
        self.add_(tensor, seed, alpha)  # the kernel's add, then z a second time (cheap: it is generated)
        return self.view(tensor, seed)

    @torch.no_grad()
    def update_(self, tensor: torch.Tensor, seed: int, restore: float, decay: float, alpha: float) -> None:
        if not tracing():
            perturb.update_(tensor, seed, restore, decay, alpha, threads(), start=span(tensor)[0])


GAUSSIAN = Noise("gaussian")


def gaussian_like(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """A fresh ``z ~ N(0, 1)`` shaped like ``tensor``, reproducible from ``seed`` on its device type."""
    return GAUSSIAN.draw(tensor, seed)


@torch.no_grad()
def sgd_update_(tensor: torch.Tensor, seed: int, lr: float, projected_grad: float, weight_decay: float,
                restore: float = 0.0, noise: Noise = GAUSSIAN) -> None:
    """MeZO's update for one tensor, in place: ``tensor -= lr * (g * z(seed) + wd * tensor)``.

    With ``restore`` (the ``+eps`` that ends a two-point estimate) it first adds
    ``restore * z`` with the same draw: ``z`` is drawn once, then
    ``tensor += restore z; tensor *= 1 - lr wd; tensor += -lr g z`` -- the restore
    is its own add, so the ZO2 engine (which restores inside the block's visit and
    updates at the next one) makes exactly the same operations. The single place
    this rule is called from: in-memory MeZO and the ZO2 offload engine both call it,
    so the two stay bit-identical; the noise kind carries it out (:meth:`Noise.update_`;
    ``philox`` on CUDA: one kernel launch, which rounds after the restore as an add would).
    """
    noise.update_(tensor, seed, restore, 1.0 - lr * weight_decay, -lr * projected_grad)
