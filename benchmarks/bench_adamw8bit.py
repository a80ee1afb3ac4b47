"""8-bit AdamW: optimizer-state bytes per parameter (CPU, measured from each optimizer's tensors)
and, when CUDA is available, step time and achieved bandwidth on >= 100M parameters.

    python benchmarks/bench_adamw8bit.py            # memory table; GPU table too on a CUDA machine

Providers: lowmem AdamW8bit (fused Triton step on CUDA), bitsandbytes AdamW8bit, torch AdamW
(fused=True on CUDA). Bandwidth counts the bytes the fused 8-bit step must move per element
(read p, g, 2 codes; write p, 2 codes; absmax), against a device-to-device copy of a large buffer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import markdown_table, write_result  # noqa: E402

from lowmem.memory import state_bytes  # noqa: E402
from lowmem.optim.adamw8bit import AdamW8bit  # noqa: E402


def providers(device: str) -> dict:
    """The optimizers compared; bitsandbytes' only where it is installed (the others run without it)."""
    fused = {"fused": True} if device == "cuda" else {}
    out = {"lowmem AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3, fp32_state_params=())}
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes is not installed: its rows are left out", file=sys.stderr)
    else:
        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    out["torch AdamW" + (" (fused)" if fused else "")] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, **fused)
    return out


def model_params(device: str, dtype: torch.dtype, hidden: int, layers: int, vocab: int) -> list[torch.nn.Parameter]:
    """A Llama-like parameter set: embeddings, per layer 4 attention + 3 MLP matrices and 2 norms."""
    shapes = [(vocab, hidden), (vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(4 * hidden, hidden)] * 2 + [(hidden, 4 * hidden)] + [(hidden,)] * 2
    return [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes]


def one_step(opt, params) -> None:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()


def memory_table(hidden: int, layers: int, vocab: int) -> str:
    rows = []
    for name, make in providers("cpu").items():
        params = model_params("cpu", torch.float32, hidden, layers, vocab)
        opt = make(params)
        one_step(opt, params)
        big = [p for p in params if p.numel() >= 4096]
        n_all, n_big = sum(p.numel() for p in params), sum(p.numel() for p in big)
        rows.append([name, f"{n_all:,}", f"{state_bytes(opt) / 2**20:.2f}", f"{state_bytes(opt) / n_all:.4f}",
                     f"{state_bytes(opt, big) / n_big:.4f}"])
    return markdown_table(["optimizer", "params", "state MiB", "B/param (all)", "B/param (tensors >= 4096)"], rows)


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), 20)


def gpu_table(hidden: int, layers: int, vocab: int, repeats: int) -> str:
    rows = []
    peak = copy_bandwidth(1 << 30)
    for dtype in (torch.bfloat16, torch.float32):
        for name, make in providers("cuda").items():
            params = model_params("cuda", dtype, hidden, layers, vocab)
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opt = make(params)
            seconds = timed(opt.step, repeats)
            n = sum(p.numel() for p in params)
            elt = params[0].element_size()
            moved = n * (3 * elt + 4 + 16 / 256) if "8bit" in name else n * (3 * elt + 16)
            rows.append([str(dtype).replace("torch.", ""), name, f"{n / 1e6:.0f}M", f"{seconds * 1e3:.2f}",
                         f"{moved / seconds / 1e9:.0f}", f"{moved / seconds / peak:.0%}"])
            del opt, params
            torch.cuda.empty_cache()
    rows.append(["-", "device-to-device copy (1 GiB)", "-", "-", f"{peak / 1e9:.0f}", "100%"])
    return markdown_table(["dtype", "optimizer", "params", "step ms", "GB/s (model)", "of copy"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "0")  # CPU memory run: PyTorch reference step
    table = memory_table(args.hidden, args.layers, args.vocab)
    notes = ("State bytes are summed over each optimizer's own state tensors (lowmem.memory.state_bytes): "
             "codes (uint8), absmax (fp32), step counters, and the fp32 state of tensors below 4096 "
             "elements (norms). bitsandbytes also keeps the two 256-value maps per tensor (2 KiB each).")
    if torch.cuda.is_available():
        table += "\n\n### GPU step time (Llama-like, hidden 2048, 24 layers, vocab 32000)\n\n"
        table += gpu_table(2048, 24, 32000, args.repeats)
    else:
        notes += "\n\nNo CUDA device here: the GPU step-time section runs when this script is run on a GPU."
    write_result("bench_adamw8bit", "8-bit AdamW: state memory and step time", table, notes)


if __name__ == "__main__":
    main()
