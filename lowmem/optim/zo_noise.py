"""Seeded perturbations shared by every zeroth-order method (MeZO, ZO-AdaMU, ZO2, distributed ZO).

MeZO (Malladi et al., 2023, Algorithm 1) regenerates the perturbation ``z`` from a
seed instead of storing it. The reference reseeds the *global* RNG and walks the
parameters in order, so ``z`` depends on iteration order and on every other
consumer of the global RNG. Here each parameter gets its own seed (:mod:`lowmem.optim.zo_seed`)::

    seed(p) = mix(step_seed, stream, index(p))

and ``z`` is a pure function of ``(kind, seed, shape, device type, dtype)``. Hence

* ``z`` for a parameter is identical whichever order parameters are visited in,
  so the ZO2 engine (block by block, on another device copy) draws the very
  same ``z`` as in-memory MeZO -- bit for bit on the same device type;
* the global RNG (dropout, data sampling) is never touched;
* distributed ZO regenerates any rank's perturbation from ``(step_seed, stream)``
  with ``stream = rank * samples_per_rank + sample``.

Kinds of ``z`` (recipe field ``optim.args.noise``):

``gaussian`` (default)
    ``z ~ N(0, I)`` (MeZO). The tensor is cut into chunks of ``2^17`` elements,
    chunk ``k`` drawn by ``normal_`` from a private generator seeded with
    ``mix(seed, k)`` (one chunk: ``seed`` itself), on ``torch.get_num_threads()``
    threads (torch ops release the GIL); the values do not depend on the thread
    count. On an accelerator one generator fills the whole tensor (no chunks).
``rademacher``
    ``z_i = +-1`` with probability 1/2 (Spall 1992's SPSA perturbation): one random
    bit per element, 32 per generator call, unpacked through a 256 x 8 table of
    signs. Same chunks and threads. ``E[z z^T] = I``, so ``g z`` is still an
    unbiased estimate of the smoothed gradient's direction (Spall 1992, §III).
``table``
    Slices of one shared table of ``2^25`` normals (128 MiB in fp32, made once per
    process, device and dtype from a fixed seed on the CPU, so identical on every
    device): parameter ``p`` reads ``table[o : o + numel(p)]`` with the offset
    ``o = seed mod (2^25 - numel(p) + 1)`` (OpenAI's evolution strategies,
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
from concurrent.futures import ThreadPoolExecutor

import torch

from lowmem.kernels import perturb
from lowmem.optim.zo_seed import mix_seed, param_seed  # noqa: F401 -- param_seed re-exported with the noise

NOISE_KINDS = ("gaussian", "rademacher", "table", "philox")
CHUNK = 1 << 17          # elements drawn from one generator
TABLE_SIZE = 1 << 25     # entries of the shared noise table
_TABLE_SEED = 0x5EED_7AB1E
_local = threading.local()
_tables: dict[tuple, torch.Tensor] = {}
_tables_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _tracing() -> bool:
    """True under fake tensors (the planner's trace, ``--plan``): then nothing is cached for later real
    steps and no work goes to other threads (a dispatch mode is per thread)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def _threads() -> ThreadPoolExecutor | None:
    global _pool
    n = torch.get_num_threads()
    if n < 2:
        return None
    if _pool is None or _pool._max_workers != n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lowmem-noise")
    return _pool


def _signs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds +-1 for the 8 bits of byte b (bit i -> column i)."""
    key = ("signs", device, dtype)
    if key not in _tables or _tracing():
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        signs = (bits * 2 - 1).to(device=device, dtype=dtype)
        if _tracing():
            return signs
        _tables[key] = signs
    return _tables[key]


def _fill_chunk(out: torch.Tensor, seed: int, kind: str) -> None:
    """``out`` (flat, contiguous) <- the kind's noise from a generator seeded with ``seed``."""
    gen = torch.Generator(device=out.device).manual_seed(seed)
    if kind == "gaussian":
        out.normal_(generator=gen)
        return
    n = out.numel()
    words = torch.empty((n + 31) // 32, dtype=torch.int32, device=out.device)
    words.random_(-(1 << 31), 1 << 31, generator=gen)
    rows = words.view(torch.uint8)[: (n + 7) // 8].to(torch.int32)
    signs = _signs(out.device, out.dtype)
    if n % 8 == 0:
        torch.index_select(signs, 0, rows, out=out.view(-1, 8))
    else:
        out.copy_(signs.index_select(0, rows).view(-1)[:n])


def _fill(out: torch.Tensor, seed: int, kind: str) -> None:
    n = out.numel()
    if n <= CHUNK or out.device.type != "cpu" or _tracing():  # an accelerator fills a whole tensor in parallel
        _fill_chunk(out, seed, kind)
        return
    starts = range(0, n, CHUNK)
    work = lambda k: _fill_chunk(out[starts[k]:starts[k] + CHUNK], mix_seed(seed, k), kind)  # noqa: E731
    pool = _threads()
    if pool is None:
        for k in range(len(starts)):
            work(k)
    else:
        list(pool.map(work, range(len(starts))))


def noise_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The shared table of ``TABLE_SIZE`` N(0, 1) values on ``device`` in ``dtype`` (made once)."""
    key = ("table", torch.device(device), dtype, TABLE_SIZE)
    with _tables_lock:
        if key not in _tables or _tracing():
            cpu = torch.empty(TABLE_SIZE, dtype=torch.float32)
            _fill(cpu, _TABLE_SEED, "gaussian")
            table = cpu.to(device=device, dtype=dtype)
            if _tracing():
                return table
            _tables[key] = table
        return _tables[key]


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

    def _window(self, like: torch.Tensor, seed: int) -> torch.Tensor | None:
        """The table slice for ``like`` (None when ``like`` is larger than the table)."""
        n = like.numel()
        if n > TABLE_SIZE:
            return None
        o = seed % (TABLE_SIZE - n + 1)
        return noise_table(like.device, like.dtype)[o:o + n]

    def _into(self, out: torch.Tensor, seed: int) -> torch.Tensor:
        """``z`` written into the flat ``out``."""
        if self.kind != "table":
            _fill(out, seed, self.kind)
            return out
        window = self._window(out, seed)
        if window is not None:
            return out.copy_(window)
        table, n, size = noise_table(out.device, out.dtype), out.numel(), TABLE_SIZE // 2
        for k, start in enumerate(range(0, n, size)):
            m = min(size, n - start)
            o = mix_seed(seed, k) % (TABLE_SIZE - m + 1)
            out[start:start + m].copy_(table[o:o + m])
        return out

    def view(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        """Read-only ``z`` shaped like ``like``; valid until this thread's next ``view``."""
        window = self._window(like, seed) if self.kind == "table" else None
        z = window if window is not None else self._into(_scratch(like), seed)
        return z.view(like.shape)

    def draw(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        """A fresh ``z`` shaped like ``like`` that the caller may modify."""
        out = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return self._into(out, seed).view(like.shape)

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

    def _into(self, out: torch.Tensor, seed: int) -> torch.Tensor:
        if not _tracing():
            perturb.write_normal_(out, seed, _threads())
        return out

    def view(self, like: torch.Tensor, seed: int) -> torch.Tensor:
        return self._into(_scratch(like), seed).view(like.shape)

    @torch.no_grad()
    def add_(self, tensor: torch.Tensor, seed: int, alpha: float) -> None:
        if not _tracing():
            perturb.add_(tensor, seed, alpha, _threads())

    @torch.no_grad()
    def add_view_(self, tensor: torch.Tensor, seed: int, alpha: float) -> torch.Tensor:
        self.add_(tensor, seed, alpha)  # the kernel's add, then z a second time (cheap: it is generated)
        return self.view(tensor, seed)

    @torch.no_grad()
    def update_(self, tensor: torch.Tensor, seed: int, restore: float, decay: float, alpha: float) -> None:
        if not _tracing():
            perturb.update_(tensor, seed, restore, decay, alpha, _threads())


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
