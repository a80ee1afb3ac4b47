"""Zeroth-order noise keyed by the element's position: the rule every ZO path draws ``z`` by.

A parameter's ``z`` (:mod:`lowmem.optim.zo_noise`) is a pure function of the parameter's seed and
of each element's flat (row-major) position ``e`` in the *whole* parameter of ``n`` elements, so a
part of the parameter -- the elements ``[s, s + m)`` that an FSDP2 rank holds
(:mod:`lowmem.optim.zo_shard`) -- can be drawn alone, and is bit for bit the slice of the
one-process ``z``: one process and N processes perturb and update alike (issue #26).

``gaussian``, ``rademacher``: torch's generators cannot skip ahead (the CPU's is MT19937), so the
parameter is cut into chunks of ``C`` elements (:func:`chunk_elements`: ``CHUNK`` on the CPU,
``ACCEL_CHUNK`` on an accelerator); chunk ``k`` covers ``[kC, min((k+1)C, n))`` and is drawn
whole by its own generator seeded with::

    seed_k = seed                 (n <= C: one chunk)
             mix(seed, k)         (otherwise; SplitMix64, lowmem.optim.zo_seed)

A part draws only the chunks that overlap it: those inside it straight into the output, the (at
most two) that cross its ends whole into a temporary of at most ``C`` elements, then sliced. A rank
holding ``m`` of ``n`` elements thus draws fewer than ``m + 2C`` of them (not ``n``), with a
temporary of ``m`` (the output) plus ``C`` elements. On the CPU the chunks of one call run on
``torch.get_num_threads()`` threads, in contiguous runs (torch ops release the GIL); the values do
not depend on the thread count. On an accelerator they are launched in order on the caller's stream.

``CHUNK`` was chosen by measurement (``benchmarks/bench_zo_keyed.py``, results/zo_keyed.md): a
whole draw of a 4.1 M-element matrix takes CPU times within 4% of each other with chunks of
``2^15`` to ``2^17`` elements (the per-chunk generator setup, ~10 us, is a few per cent of a chunk's
draw; 12% more at ``2^14``, 31% at ``2^13``), and ``2^15`` keeps a shard's edges small (a rank of 4
draws 3% beyond its rows, 15% with ``2^17``). ``ACCEL_CHUNK`` is not measured yet (no GPU lent; ``--device cuda``): one
generator launch per chunk, so chunks large enough (16 MiB of fp32 output) that a chunk's kernel
outlasts its launch and generator setup, while a 4096 x 4096 matrix still has 4 of them.

``table``: ``z_e = T[o + e]`` with ``o = seed mod (2^25 - n + 1)`` (Salimans et al. 2017's shared
table; for ``n > 2^25`` windows of ``2^24`` elements at offsets ``mix(seed, k)``): a part is the
slice of its window(s), nothing is drawn. ``philox``: ``z_e`` is counter-based
(:mod:`lowmem.kernels.perturb`), a part is generated at its positions directly.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from lowmem.optim.zo_seed import mix_seed

CHUNK = 1 << 15          # elements per generator on the CPU (chosen by measurement, module docstring)
ACCEL_CHUNK = 1 << 22    # on an accelerator: one launch per chunk, so larger chunks (launch overhead)
TABLE_SIZE = 1 << 25     # entries of the shared noise table
_TABLE_SEED, _TABLE_CHUNK = 0x5EED_7AB1E, 1 << 17  # the table's own draw (fixed, whatever CHUNK is)
_tables: dict[tuple, torch.Tensor] = {}
_tables_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def tracing() -> bool:
    """True under fake tensors (the planner's trace, ``--plan``): then nothing is cached for later real
    steps and no work goes to other threads (a dispatch mode is per thread)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def threads() -> ThreadPoolExecutor | None:
    """The noise threads (``torch.get_num_threads()`` of them; None for one)."""
    global _pool
    n = torch.get_num_threads()
    if n < 2:
        return None
    if _pool is None or _pool._max_workers != n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lowmem-noise")
    return _pool


def chunk_elements(device: torch.device) -> int:
    """``C``: the elements of one generator's chunk on ``device``'s type."""
    return CHUNK if device.type == "cpu" else ACCEL_CHUNK


def _signs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds +-1 for the 8 bits of byte b (bit i -> column i)."""
    key = ("signs", device, dtype)
    if key not in _tables or tracing():
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        signs = (bits * 2 - 1).to(device=device, dtype=dtype)
        if tracing():
            return signs
        _tables[key] = signs
    return _tables[key]


def fill_chunk_(out: torch.Tensor, seed: int, kind: str) -> None:
    """``out`` (flat, contiguous: one whole chunk) <- the kind's noise from a generator seeded with ``seed``."""
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


def by_chunks(out: torch.Tensor, start: int, total: int, size: int, piece) -> None:
    """``piece(k, c0, c1, a, b, dst)`` for each chunk ``k = [c0, c1)`` of a ``total``-element parameter cut
    every ``size`` elements that overlaps ``out``'s elements ``[start, start + len)``: ``[a, b)`` is the
    overlap, ``dst`` its place in ``out``. On the CPU contiguous runs of chunks go to the noise threads."""
    n = out.numel()
    if n == 0:
        return
    ks = range(start // size, (start + n - 1) // size + 1)

    def work(k: int) -> None:
        c0, c1 = k * size, min((k + 1) * size, total)
        a, b = max(c0, start), min(c1, start + n)
        piece(k, c0, c1, a, b, out[a - start:b - start])

    # CPU only: another thread would launch an accelerator's kernels on its default stream, not the caller's
    pool = threads() if len(ks) > 1 and out.device.type == "cpu" and not tracing() else None
    if pool is None:
        for k in ks:
            work(k)
        return
    runs = pool._max_workers
    bounds = [ks[0] + len(ks) * i // runs for i in range(runs + 1)]
    list(pool.map(lambda i: [work(k) for k in range(bounds[i], bounds[i + 1])], range(runs)))


def fill_(out: torch.Tensor, seed: int, kind: str, start: int = 0, total: int | None = None,
          size: int | None = None) -> torch.Tensor:
    """``out`` (flat, contiguous) <- elements ``[start, start + len)`` of the ``gaussian``/``rademacher``
    ``z(seed)`` of a ``total``-element parameter (``total``: ``out``'s own size) by the chunk rule
    (``size``: the chunk, :func:`chunk_elements` unless given)."""
    n = out.numel()
    total = n if total is None else total
    size = size or chunk_elements(out.device)
    if (start == 0 and n == total <= size) or tracing():  # one whole chunk (first: the common, cheap case),
        fill_chunk_(out, seed, kind)                       # or fake values: one fill, no generator per chunk
        return out

    def piece(k, c0, c1, a, b, dst):
        seed_k = seed if total <= size else mix_seed(seed, k)
        if (a, b) == (c0, c1):
            fill_chunk_(dst, seed_k, kind)
        else:  # a chunk across an end of the part: drawn whole, sliced
            whole = torch.empty(c1 - c0, dtype=out.dtype, device=out.device)
            fill_chunk_(whole, seed_k, kind)
            dst.copy_(whole[a - c0:b - c0])

    by_chunks(out, start, total, size, piece)
    return out


def noise_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The shared table of ``TABLE_SIZE`` N(0, 1) values on ``device`` in ``dtype`` (made once, on the CPU
    from a fixed seed, so identical on every device)."""
    key = ("table", torch.device(device), dtype, TABLE_SIZE)
    with _tables_lock:
        if key not in _tables or tracing():
            cpu = fill_(torch.empty(TABLE_SIZE, dtype=torch.float32), _TABLE_SEED, "gaussian", size=_TABLE_CHUNK)
            table = cpu.to(device=device, dtype=dtype)
            if tracing():
                return table
            _tables[key] = table
        return _tables[key]


def _table_offset(seed: int, k: int, total: int, length: int) -> int:
    """Where window ``k`` (``length`` entries) of a ``total``-element parameter starts in the table."""
    return (seed if total <= TABLE_SIZE else mix_seed(seed, k)) % (TABLE_SIZE - length + 1)


def _window_size(total: int) -> int:
    """The length of a table window for a ``total``-element parameter: the whole table for a parameter no
    larger than it, else half the table."""
    return TABLE_SIZE if total <= TABLE_SIZE else TABLE_SIZE // 2


def table_window(seed: int, start: int, n: int, total: int, device, dtype) -> torch.Tensor | None:
    """The table slice holding ``z[start : start + n]`` when those elements lie in one window (a view,
    nothing copied); None when they cross windows."""
    size = _window_size(total)
    k = start // size
    c0, c1 = k * size, min((k + 1) * size, total)
    if start + n > c1:
        return None
    o = _table_offset(seed, k, total, c1 - c0)
    return noise_table(device, dtype)[o + start - c0:o + start - c0 + n]


def table_fill_(out: torch.Tensor, seed: int, start: int = 0, total: int | None = None) -> torch.Tensor:
    """``out`` (flat) <- ``z[start : start + len]`` of the ``table`` kind, window by window."""
    total = out.numel() if total is None else total
    table = noise_table(out.device, out.dtype)
    size = _window_size(total)

    def piece(k, c0, c1, a, b, dst):
        o = _table_offset(seed, k, total, c1 - c0)
        dst.copy_(table[o + a - c0:o + b - c0])

    by_chunks(out, start, total, size, piece)
    return out
