"""CPU kernels of blockwise 8-bit quantization and of the fused 8-bit steps (``blockwise_cpu.c``).

The PyTorch references (:mod:`lowmem.kernels.quantize`, :mod:`lowmem.kernels.adamw8bit_step`) make
about thirty passes over memory per step and find each code with ``torch.bucketize``, a binary
search of some 60 ns per element on one core: an 8-bit AdamW step on CPU took 25-30x torch's AdamW
(issue #24). These loops make one pass, find a code with a table lookup and two comparisons, and
give the references' bits (the C file says how); the blocks of a tensor are split between
``torch.get_num_threads()`` threads (ctypes releases the GIL during a call).

The C file is compiled on first use by the system's C compiler (``$CC``, else ``cc``: Triton needs
one as well), with ``-O3 -march=native``, and cached under ``$XDG_CACHE_HOME/lowmem`` (default
``~/.cache/lowmem``) by a hash of the source, the flags, the compiler and the CPU. Without a
compiler (one warning), and for what the kernels do not take (fp64 parameters, a gradient of
another dtype, non-contiguous tensors, a code without a table), the callers use the references.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from lowmem.kernels.dynamic_map import dynamic_map

SOURCE = Path(__file__).with_name("blockwise_cpu.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c11",
         "-fPIC", "-shared")
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # p's dtypes the steps take
MIN_BLOCKS_PER_THREAD = 64   # fewer and a thread's hand-off costs more than its share
SQRT_PIECE = 1 << 16         # elements per piece of the Adam step: its two fp32 scratch buffers stay in L2

_ptr, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class QMap(ctypes.Structure):
    """The C ``qmap``: a code's values, midpoints and lookup table (:func:`_table`)."""

    _fields_ = [("code", _ptr), ("lut", _ptr), ("keep_sign", _i32), ("first_nonneg", _i32)]


_QMAP = ctypes.POINTER(QMap)
_SIGNATURES = {
    "quantize_f32": [_ptr, _i64, _i64, _i64, _i32, _QMAP, _ptr, _ptr],
    "dequantize_f32": [_ptr, _ptr, _i64, _i64, _i64, _i32, _ptr, _ptr],
    **{f"adam8bit_moments_{s}": [_ptr] * 5 + [_i64, _i64, _i64, _i32, _ptr, _QMAP, _QMAP, _ptr, _ptr]
       for s in SUFFIX.values()},
    **{f"adam8bit_param_{s}": [_ptr] * 4 + [_i64, _ptr] for s in SUFFIX.values()},
    **{f"momentum8bit_{s}": [_ptr] * 4 + [_i64, _i64, _i64, _i32, _f32, _f32, _f32, _i32, _QMAP]
       for s in SUFFIX.values()},
}


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _compile() -> Path:
    """The shared library, compiled into the cache unless there already (written atomically)."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_id()]).encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowmem"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="lowmem-"))
    lib = cache / f"blockwise_cpu-{key[:16]}.so"
    if not lib.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
        os.replace(tmp, lib)
    return lib


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (warned once) when they cannot be built."""
    try:
        lib = ctypes.CDLL(str(_compile()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"lowmem: the CPU 8-bit kernels are unavailable ({err}); 8-bit optimizer states on CPU "
                      "use the slower PyTorch path", stacklevel=3)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    return lib


_TABLES: dict[tuple[bytes, bool], tuple | None] = {}


def _table(code: torch.Tensor, keep_sign: bool = False) -> tuple | None:
    """``(QMap, the tensors it points to)`` for ``code``, cached by its values; None when the code is
    unsorted or some 16-bit key's interval of floats in [-1, 1] holds more than one midpoint (the
    kernels would not find the nearest code; the reference takes such a code). The table's packing
    is the C file's."""
    key = (code.detach().cpu().numpy().tobytes(), keep_sign)
    if key not in _TABLES:
        code = code.detach().cpu().clone()
        mid = (code[:-1] + code[1:]) / 2                             # the reference's midpoints, in fp32
        keys = np.arange(1 << 16, dtype=np.uint32)
        low, high = (torch.from_numpy((keys << 16 | tail).view(np.float32)) for tail in (0, 0xFFFF))
        negative = torch.from_numpy(keys >= 0x8000)
        smallest, largest = torch.where(negative, high, low), torch.where(negative, low, high)
        nan = torch.from_numpy((keys >> 7 & 0xFF) == 0xFF)         # all-ones exponent: NaN (s is clamped)
        base = torch.bucketize(smallest, mid)
        inside = torch.bucketize(largest, mid) - base                # midpoints in the interval
        base[nan], inside[nan] = torch.bucketize(torch.tensor([float("nan")]), mid), 0
        if bool((mid.diff() < 0).any()) or int(inside[smallest.abs() <= 1].max()) > 1:
            _TABLES[key] = None
        else:
            has = inside > 0
            low_bits = torch.where(has, mid[base.clamp(max=254)].view(torch.int32) & 0xFFFF, 0)
            lut = (base | low_bits << 8 | has.int() << 24).to(torch.int32)
            qmap = QMap(code.data_ptr(), lut.data_ptr(), int(keep_sign), int((code < 0).sum()))
            _TABLES[key] = (qmap, code, lut)
    return _TABLES[key]


def takes(code: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: real (not the planner's fake tensors) CPU tensors,
    contiguous, a table for ``code``, and the library built."""
    return (all(t.device.type == "cpu" and t.is_contiguous() and not is_fake(t) for t in (code, *tensors))
            and _table(code) is not None and library() is not None)


def steps_take(p: torch.Tensor, g: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether the fused steps take these tensors: :func:`takes`, ``p`` fp32/bf16/fp16, ``g`` of its dtype."""
    return (p.dtype in SUFFIX and g.dtype == p.dtype and takes(dynamic_map(True), p, g, *state)
            and _table(dynamic_map(False)) is not None)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowmem-8bit")


def _over_blocks(fn, nblocks: int) -> None:
    """``fn(b0, b1)`` on ranges of blocks covering ``[0, nblocks)``, one range per thread."""
    threads = max(1, min(torch.get_num_threads(), nblocks // MIN_BLOCKS_PER_THREAD))
    if threads == 1:
        fn(0, nblocks)
        return
    bounds = [nblocks * i // threads for i in range(threads + 1)]
    futures = [_pool(threads - 1).submit(fn, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    fn(bounds[0], bounds[1])
    for future in futures:
        future.result()


def quantize_blockwise_cpu(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~lowmem.kernels.quantize.quantize_blockwise_ref`, bit for bit."""
    qmap = ctypes.byref(_table(code)[0])
    flat = x.reshape(-1).float().contiguous()
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    kernel = library().quantize_f32
    _over_blocks(lambda b0, b1: kernel(flat.data_ptr(), n, b0, b1, blocksize, qmap, codes.data_ptr(),
                                       absmax.data_ptr()), absmax.numel())
    return codes, absmax


def dequantize_blockwise_cpu(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                             shape) -> torch.Tensor:
    """:func:`~lowmem.kernels.quantize.dequantize_blockwise_ref`, bit for bit."""
    out = torch.empty(codes.numel(), dtype=torch.float32)
    kernel = library().dequantize_f32
    _over_blocks(lambda b0, b1: kernel(codes.data_ptr(), absmax.data_ptr(), codes.numel(), b0, b1, blocksize,
                                       code.data_ptr(), out.data_ptr()), absmax.numel())
    return out.view(shape)


def adam8bit_step_cpu(p, g, codes1, absmax1, codes2, absmax2, k, blocksize: int) -> None:
    """:func:`~lowmem.kernels.adamw8bit_step.adam8bit_step_ref`, bit for bit, by pieces of
    ``SQRT_PIECE`` elements (whole blocks): the moments kernel requantizes m and v and leaves their
    fp32 values in two scratch buffers, torch takes sqrt(v) in place (the reference's sqrt, see the
    C file), the parameter kernel updates p."""
    lib, sfx, n, elt = library(), SUFFIX[p.dtype], p.numel(), p.element_size()
    moments, param = getattr(lib, f"adam8bit_moments_{sfx}"), getattr(lib, f"adam8bit_param_{sfx}")
    q1, q2 = ctypes.byref(_table(dynamic_map(True), True)[0]), ctypes.byref(_table(dynamic_map(False))[0])
    scalars = torch.tensor([k.beta1, k.beta2, k.one_minus_beta1, k.one_minus_beta2, k.step_size, k.eps_hat, k.decay],
                           dtype=torch.float32)
    piece = max(SQRT_PIECE // blocksize, 1)

    def run(b0: int, b1: int) -> None:
        m = torch.empty(min(piece, b1 - b0) * blocksize, dtype=torch.float32)
        v = torch.empty_like(m)
        for s0 in range(b0, b1, piece):
            s1 = min(s0 + piece, b1)
            e0, e1 = s0 * blocksize, min(s1 * blocksize, n)
            moments(g.data_ptr(), codes1.data_ptr(), absmax1.data_ptr(), codes2.data_ptr(), absmax2.data_ptr(), n,
                    s0, s1, blocksize, scalars.data_ptr(), q1, q2, m.data_ptr(), v.data_ptr())
            torch.sqrt(v[: e1 - e0], out=v[: e1 - e0])
            param(p.data_ptr() + e0 * elt, g.data_ptr() + e0 * elt, m.data_ptr(), v.data_ptr(), e1 - e0,
                  scalars.data_ptr())

    _over_blocks(run, absmax1.numel())


def momentum8bit_step_cpu(p, g, codes1, absmax1, lr: float, beta1: float, weight_decay: float, step: int,
                          blocksize: int) -> None:
    """:func:`~lowmem.kernels.adamw8bit_step.momentum8bit_step_ref`, bit for bit."""
    kernel = getattr(library(), f"momentum8bit_{SUFFIX[p.dtype]}")
    q1 = ctypes.byref(_table(dynamic_map(True), True)[0])
    _over_blocks(lambda b0, b1: kernel(p.data_ptr(), g.data_ptr(), codes1.data_ptr(), absmax1.data_ptr(), p.numel(),
                                       b0, b1, blocksize, lr, beta1, weight_decay, int(step == 1), q1),
                 absmax1.numel())
