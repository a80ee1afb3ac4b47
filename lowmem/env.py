"""``lowmem-train --env`` / ``python -m lowmem.env``: the environment report to paste into a bug report.

As ``accelerate env`` and DeepSpeed's ``ds_report``: versions, CUDA devices (memory, bf16), how lowmem's Triton
kernels run, the bitsandbytes library that would load, whether DeepSpeed's async I/O (NVMe) op can be built, and
whether bf16 autocast is native on this CPU. Fast and side-effect free: optional packages are read from their
installed metadata and files, never imported (bitsandbytes and DeepSpeed print on import; DeepSpeed would pick
an accelerator), and nothing is compiled.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

# (distribution, the extra that installs it; None: a core dependency)
PACKAGES = [("torch", None), ("transformers", None), ("accelerate", None), ("bitsandbytes", "gpu"),
            ("triton", "gpu"), ("deepspeed", "deepspeed"), ("peft", "peft"), ("lowmem", None)]
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "HF_HUB_OFFLINE", "HF_HOME", "OMP_NUM_THREADS",
            "BNB_CUDA_VERSION")


def version(dist: str, extra: str | None) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed" + (f" (pip install 'lowmem[{extra}]')" if extra else "")


def torch_build() -> str:
    import torch

    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build" + (f", cuDNN {torch.backends.cudnn.version()}"
                                                     if torch.backends.cudnn.is_available() else "")
    return "ROCm build " + torch.version.hip if getattr(torch.version, "hip", None) else "CPU-only build"


def cuda_devices() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none"
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = "bf16 native" if p.major >= 8 else "no native bf16"
        lines.append(f"{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, {bf16}")
    return "; ".join(lines)


def triton_mode() -> str:
    import torch

    if importlib.util.find_spec("triton") is None:
        return "not installed: lowmem's kernels run their PyTorch references"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter (TRITON_INTERPRET=1): the kernels run on CPU tensors too, slowly"
    if torch.cuda.is_available():
        return "compiled for CUDA tensors"
    return "installed, no GPU: CPU tensors take the PyTorch references"


def bitsandbytes_backend() -> str:
    """The native library bitsandbytes would load (its ``cuda_specs`` rule: ``libbitsandbytes_cuda<major><minor>``
    after torch's CUDA version, or ``BNB_CUDA_VERSION``; ``libbitsandbytes_cpu`` without a GPU)."""
    import torch

    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return "not installed"
    folder = Path(spec.submodule_search_locations[0])
    if torch.cuda.is_available() and torch.version.cuda:
        cuda = os.environ.get("BNB_CUDA_VERSION") or torch.version.cuda.replace(".", "")[:3]
        name = f"libbitsandbytes_cuda{cuda}.so"
    else:
        name = "libbitsandbytes_cpu.so"
    return f"{name} ({'present' if (folder / name).exists() else 'MISSING from the installed package'})"


def async_io() -> str:
    """DeepSpeed's async I/O op (NVMe offload) builds against libaio: its builder links ``-laio`` and includes
    ``libaio.h`` (the libaio-dev / libaio-devel package). Checked without compiling."""
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed not installed"
    library = ctypes.util.find_library("aio")
    dirs = [Path("/usr/include"), Path("/usr/local/include"),
            *(Path(d) for d in os.environ.get("CPATH", "").split(":") if d)]
    header = any((d / "libaio.h").exists() for d in dirs)
    if library and header:
        return f"buildable (libaio: {library}, libaio.h found)"
    missing = " and ".join(what for what, ok in (("the libaio library", library), ("libaio.h", header)) if not ok)
    return f"not buildable: {missing} not found (apt install libaio-dev / dnf install libaio-devel)"


def cpu_bf16() -> str:
    from lowmem.dtypes import cpu_bf16_native, native_bf16_precision

    native = "native" if cpu_bf16_native() else "not native (bf16 matmuls take a ~50x slower path)"
    return f"{native}; train.mixed_precision auto resolves to '{native_bf16_precision()}' here"


def report() -> list[tuple[str, str]]:
    """(item, value) pairs; an item that cannot be determined says why instead of raising."""
    items = [("lowmem env", "paste this report into a bug report"),
             ("python", f"{platform.python_version()} ({sys.executable})"),
             ("platform", platform.platform()), ("CPU", _cpu_name())]
    items += [(dist, version(dist, extra)) for dist, extra in PACKAGES]
    for name, probe in [("torch build", torch_build), ("CUDA devices", cuda_devices), ("Triton kernels", triton_mode),
                        ("bitsandbytes backend", bitsandbytes_backend), ("DeepSpeed async I/O", async_io),
                        ("bf16 autocast on this CPU", cpu_bf16)]:
        try:
            items.append((name, probe()))
        except Exception as err:  # a report must come out whole: say what failed instead
            items.append((name, f"unknown ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"))
    items.append(("CPU threads", f"{os.cpu_count()} cores, torch uses {_torch_threads()}"))
    items += [(f"${var}", os.environ[var]) for var in ENV_VARS if var in os.environ]
    return items


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return name or platform.processor() or platform.machine()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def format_report(items: list[tuple[str, str]]) -> str:
    return "\n".join(f"- {name}: {value}" for name, value in items)


def main() -> int:
    print(format_report(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
