"""Optimizer step time on CPU relative to ``torch.optim.AdamW`` on the same parameters, and the
amortized cost of the projection refresh (SVD for GaLore, a seeded draw for APOLLO, a new
subspace for FRUGAL) at the default update gap T=200.

Model: Llama-shaped (hidden 512, intermediate 2048, 2 layers, vocab 4096) in fp32, with fixed
random gradients. "step" is the median of timed steps without a refresh; "refresh" is the
first step (which always refreshes); amortized = (refresh - step) / T.

``--8bit`` (issue #24): the 8-bit AdamW step on CPU beside torch AdamW and bitsandbytes'
``AdamW8bit``, on 16 ``Linear(1024, 1024)`` layers (16.8M parameters, fp32), at 1 and 2 threads;
lowmem's row on its C kernels (:mod:`lowmem.kernels.blockwise_cpu`) and on the PyTorch references.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
import warnings
from unittest import mock

import torch

from _common import markdown_table, write_result
from lowmem import create_optimizer

GAP = 200
CASES = [("AdamW (torch)", "adamw", {}), ("GaLore r=128", "galore_adamw", dict(rank=128)),
         ("APOLLO r=128", "apollo", dict(rank=128)), ("APOLLO-Mini", "apollo_mini", {}),
         ("FRUGAL rho=0.25 blocks", "frugal", dict(density=0.25)),
         ("FRUGAL rho=0.25 columns", "frugal", dict(density=0.25, proj_type="columns")),
         ("SGD-SaI", "sgd_sai", {}), ("SWAN (10 NS steps)", "swan", {}), ("SinkGD (5 iterations)", "sinkgd", {})]
PROJECTED = ("galore_adamw", "apollo", "apollo_mini", "frugal")  # take update_proj_gap


def build_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def time_steps(name: str, hparams: dict, steps: int = 6) -> tuple[float, float]:
    model = build_model()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    extra = dict(update_proj_gap=GAP) if name in PROJECTED else {}
    opt = create_optimizer(model, name, lr=1e-4, **hparams, **extra)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), times[0]


def interleaved_ratio(name: str, hparams: dict, pairs: int = 5) -> tuple[float, float]:
    """Median over ``pairs`` of (method step / AdamW step), the two steps taken back to back on two
    copies of the model, so that a load change on a shared machine hits both sides of each ratio."""
    times = {}
    opts = {}
    for key, n, h in (("adamw", "adamw", {}), ("method", name, hparams)):
        model = build_model()
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opts[key] = create_optimizer(model, n, lr=1e-4, **h, **(dict(update_proj_gap=GAP) if n in PROJECTED else {}))
        opts[key].step()  # first step (state creation, refresh) not timed
        times[key] = []
    for _ in range(pairs):
        for key in ("adamw", "method"):
            start = time.perf_counter()
            opts[key].step()
            times[key].append(time.perf_counter() - start)
    ratios = [m / a for m, a in zip(times["method"], times["adamw"])]
    return statistics.median(times["method"]), statistics.median(ratios)


def eight_bit_providers() -> dict:
    """The optimizers of the ``--8bit`` table: ``name -> (make, context of its steps)``."""
    import contextlib
    import sys

    from lowmem.kernels import blockwise_cpu
    from lowmem.optim.adamw8bit import AdamW8bit

    out = {"torch AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), contextlib.nullcontext)}
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes is not installed: its row is left out", file=sys.stderr)
    else:
        out["bitsandbytes AdamW8bit"] = (lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), contextlib.nullcontext)
    reference = functools.partial(mock.patch.object, blockwise_cpu, "steps_take", lambda *tensors: False)
    out["lowmem adamw8bit (C kernels)"] = (lambda ps: AdamW8bit(ps, lr=1e-3), contextlib.nullcontext)
    out["lowmem adamw8bit (PyTorch references)"] = (lambda ps: AdamW8bit(ps, lr=1e-3), reference)
    return out


def eight_bit_times(threads: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per provider, the wall times of ``rounds x steps`` steps at ``threads`` threads, the
    providers taking turns round by round (a load change on a shared machine hits them all)."""
    torch.set_num_threads(threads)
    opts, times = {}, {}
    for name, (make, context) in eight_bit_providers().items():
        torch.manual_seed(0)
        layers = [torch.nn.Linear(1024, 1024) for _ in range(16)]
        gen = torch.Generator().manual_seed(1)
        for p in (p for layer in layers for p in layer.parameters()):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opts[name] = (make([p for layer in layers for p in layer.parameters()]), context)
        with context():
            opts[name][0].step()  # state creation, not timed
        times[name] = []
    for _ in range(rounds):
        for name, (opt, context) in opts.items():
            with context():
                for _ in range(steps):
                    start = time.perf_counter()
                    opt.step()
                    times[name].append(time.perf_counter() - start)
    return times


def eight_bit_table(rounds: int, steps: int) -> None:
    rows, columns = {}, []
    load = [os.getloadavg()[0]]
    for threads in (1, 2):
        times = eight_bit_times(threads, rounds, steps)
        load.append(os.getloadavg()[0])
        base = statistics.median(times["torch AdamW"])
        for name, t in times.items():
            per_round = [statistics.median(t[i:i + steps]) for i in range(0, len(t), steps)]
            rows.setdefault(name, [name]).extend([f"{statistics.median(t) * 1e3:.1f}",
                                                  f"{min(per_round) * 1e3:.0f}-{max(per_round) * 1e3:.0f}",
                                                  f"{statistics.median(t) / base:.2f}x"])
        columns += [f"{threads} thread{'s' * (threads > 1)}: step ms", "round medians", "vs torch AdamW"]
        print(list(rows.values()), flush=True)
    write_result("optim_step_8bit", "8-bit AdamW step on CPU against torch AdamW and bitsandbytes AdamW8bit "
                 "(16 x Linear(1024, 1024), 16.8M parameters, fp32)",
                 markdown_table(["optimizer"] + columns, list(rows.values())),
                 notes=f"Wall time of one `optimizer.step()`: median of {rounds} rounds x {steps} steps, the "
                       "optimizers taking turns round by round in one process (same parameters and gradients; "
                       "the first step, which creates the state, is not timed). lowmem's two rows: its C kernels "
                       "(the CPU default) and its PyTorch references (the path before issue #24, still taken "
                       "without a C compiler). Load average (1 min) at the start, "
                       f"after the 1-thread and after the 2-thread runs: {', '.join(f'{x:.2f}' for x in load)} "
                       f"on {os.cpu_count()} cores.{_bnb_version()}")


def _bnb_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f" bitsandbytes {version('bitsandbytes')}."
    except PackageNotFoundError:
        return ""


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="labels of CASES to run (default: all)")
    ap.add_argument("--interleaved", action="store_true",
                    help="time each method against AdamW step by step (for a loaded machine): median ratio")
    ap.add_argument("--8bit", dest="eight_bit", action="store_true",
                    help="the 8-bit AdamW table: torch AdamW, bitsandbytes AdamW8bit, lowmem adamw8bit")
    ap.add_argument("--rounds", type=int, default=3, help="--8bit: rounds of interleaved steps")
    ap.add_argument("--steps", type=int, default=5, help="--8bit: timed steps per optimizer and round")
    args = ap.parse_args()
    if args.eight_bit:
        warnings.filterwarnings("ignore")
        eight_bit_table(args.rounds, args.steps)
        return
    if args.interleaved:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        rows = []
        for label, name, hparams in CASES:
            if name == "adamw" or (args.only is not None and label not in args.only):
                continue
            step, ratio = interleaved_ratio(name, hparams)
            rows.append([label, f"{step * 1e3:.1f}", f"{ratio:.2f}x"])
            print(rows[-1], flush=True)
        write_result("optim_step_interleaved", "Optimizer step time on CPU against AdamW, interleaved (1 thread, "
                     "Llama hidden 512, 2 layers, fp32)", markdown_table(["optimizer", "step ms", "vs AdamW"], rows),
                     notes="Each ratio is the median of 5 (method step / torch AdamW step) pairs taken back to back.")
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    base, _ = time_steps("adamw", {})
    rows = []
    for label, name, hparams in CASES:
        if args.only is not None and label not in args.only and name != "adamw":
            continue
        step, refresh = time_steps(name, hparams)
        amortized = max(refresh - step, 0.0) / GAP
        rows.append([label, f"{step * 1e3:.1f}", f"{step / base:.2f}x", f"{refresh * 1e3:.1f}",
                     f"{amortized * 1e3:.2f}", f"{(step + amortized) / base:.2f}x"])
        print(rows[-1], flush=True)
    table = markdown_table(["optimizer", "step ms", "vs AdamW", "refresh step ms", f"amortized refresh ms (T={GAP})",
                            "vs AdamW incl. refresh"], rows)
    write_result("optim_step", "Optimizer step time on CPU (1 thread, Llama hidden 512, 2 layers, fp32)", table,
                 notes="Medians of 6 steps after the first; the machine is shared, so expect +-20% noise.")


if __name__ == "__main__":
    main()
