"""First-order offload (Fuyou) vs in-memory training: peak memory and step time.

    python benchmarks/bench_fuyou.py            # CPU: SmolLM2-135M (default model), blocks + states mostly on NVMe
    python benchmarks/bench_fuyou.py --gpu --nvme-dir /nvme/fuyou --host-gb 64
        # GPU: Llama-3-8B shape (bf16, random init), AdamW and APOLLO-Mini through the engine vs
        # DeepSpeed ZeRO-Infinity (ZeRO-3, parameters and optimizer offloaded) at the same batch
        # and sequence: peak GPU memory and tokens/s (fuyou_gpu.py; needs deepspeed + a GPU)

CPU: each configuration runs in a fresh process (RSS is per process) through
``python -m lowmem.tools.measure --offload``: model loaded, engine set up, the kernel's RSS
high-water mark reset, then the steps (so the peak is the steps', not the GGUF loading's). The
reference peak is one no-grad forward of the whole model in memory; the reference step time is
in-memory layer-wise training with the same optimizer (same per-parameter updates). The
processes run one after another in one invocation; the machine is shared, so times are medians
over the steps after the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from _common import markdown_table, run_json, write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(recipe, path: Path, *flags: str) -> dict:
    path.write_text(yaml.safe_dump(recipe.model_dump()))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return run_json([sys.executable, "-m", "lowmem.tools.measure", str(path), "--offload", *flags], env=env, cwd=ROOT)


def cpu(args) -> None:
    from lowmem.planner import plan, with_overrides
    from lowmem.recipe import load_recipe

    tmp = Path(tempfile.mkdtemp(prefix="bench-fuyou-"))
    base = load_recipe(ROOT / "recipes" / "fuyou-nvme-cpu.yaml",
                       [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
                        f"offload.host_memory_budget_gb={args.host_gb}"])
    recipes = {o: with_overrides(base, [f"optim.name={o}", f"offload.nvme_dir={tmp / o}"]) for o in args.optims}
    predicted_peak = {o: plan(rec, "cpu").peak_bytes for o, rec in recipes.items()}
    forward = _run(base, tmp / "forward.yaml", "--forward")
    rows, gib = [], 2**30
    for optim, rec in recipes.items():
        off = _run(rec, tmp / f"{optim}-off.yaml", "--steps", str(args.steps))
        mem = _run(rec, tmp / f"{optim}-mem.yaml", "--steps", str(args.steps), "--inmemory")
        assert off["losses"] == mem["losses"], (off["losses"], mem["losses"])  # same numbers, bit for bit
        t_off, t_mem = statistics.median(off["step_s"][1:]), statistics.median(mem["step_s"][1:])
        predicted = predicted_peak[optim]
        on_nvme = sum(t == "nvme" for t in off["tiers"]["masters"]), sum(t == "nvme" for t in off["tiers"]["states"])
        n = len(off["tiers"]["masters"])
        rows.append([optim, f"{on_nvme[0]}/{n}, {on_nvme[1]}/{n}", f"{off['peak_rss'] / gib:.2f}",
                     f"{predicted / gib:.2f}", f"{mem['peak_rss'] / gib:.2f}", f"{forward['peak_rss'] / gib:.2f}",
                     f"{off['peak_rss'] / forward['peak_rss']:.2f}x", f"{t_off:.2f}", f"{t_mem:.2f}",
                     f"{t_off / t_mem:.2f}x"])
    table = markdown_table(["optimizer", "masters, states on NVMe", "offloaded peak RSS (GiB)", "--plan (GiB)",
                            "in-memory layer-wise peak RSS (GiB)", "no-grad forward peak RSS (GiB)",
                            "offloaded / forward", "offloaded step (s)", "in-memory step (s)", "time ratio"], rows)
    notes = (f"SmolLM2-135M (GGUF, fp32), batch {args.batch} x {args.seq}, host budget {args.host_gb} GB, NVMe tier "
             f"in {tempfile.gettempdir()} (page cache of the local disk), {args.steps} steps per process, times are "
             f"medians of steps 2..{args.steps}. Offloaded and in-memory losses are equal bit for bit (asserted). "
             f"Peak RSS: window after loading (fresh process each). Load average over the last minute of the run: "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    write_result("fuyou_cpu", "First-order offload (Fuyou) vs in-memory on CPU: SmolLM2-135M, blocks on NVMe",
                 table, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--optims", nargs="+", default=["adamw", "apollo_mini"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--host-gb", type=float, default=0.04)
    parser.add_argument("--nvme-dir")
    args, rest = parser.parse_known_args()
    if args.gpu:
        from fuyou_gpu import main as gpu_main

        gpu_main(sys.argv[1:])
        return
    cpu(args)


if __name__ == "__main__":
    main()
