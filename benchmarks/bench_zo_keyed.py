"""ZO noise keyed by position (issue #26): what one FSDP2 rank draws for its shard, and the chunk size.

1. chunk size (``lowmem.optim.zo_keyed.CHUNK``): one process draws the whole ``gaussian`` z of a
   ``ROWS x COLS`` parameter for each candidate chunk, rounds interleaved; beside it, the elements the
   busiest of 4 ranks generates for its shard (its rows plus the chunks across its ends).
2. per rank, N = 1, 2, 4 (rows split as FSDP2's ``Shard(0)``): seconds to draw rank r's z, the
   elements its generators produce, and the peak RSS the draw adds (measured in a fresh process:
   the output and the temporaries), keyed (each rank draws its chunks) against the rule it replaces
   (every rank draws the whole parameter's z and keeps its slice). The shard stand-ins carry
   ``noise_span`` exactly as ``lowmem.optim.zo_shard.local_shard`` sets it on a DTensor's local rows.
3. single-process MeZO step time, before (``--before REF``, the tree at that git ref) and after (this
   tree, at each candidate chunk), in fresh processes with the variants interleaved round by round: the
   tests' tiny Llama (hidden 32, 2 layers, vocab 128; batch 2 x 16) and a mid-size one (hidden 512,
   4 layers, vocab 8192; batch 2 x 64).

Usage: python benchmarks/bench_zo_keyed.py [--before main] [--rounds 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, run_json, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS, COLS = 2051, 2000           # 4.10 M elements, 15.6 MiB in fp32; shards start inside chunks
CHUNKS = [1 << 13, 1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18]
ACCEL_CHUNKS = [1 << 18, 1 << 20, 1 << 22, 1 << 24]
KINDS = ["gaussian", "rademacher", "philox"]
MODELS = {"tiny": dict(hidden=32, layers=2, vocab=128, batch=2, seq=16, repeat=10),  # repeat: x --steps
          "mid": dict(hidden=512, layers=4, vocab=8192, batch=2, seq=64, repeat=1)}


def shard_standins(n: int, device: str = "cpu", dtype=torch.float32) -> list[torch.Tensor]:
    """FSDP2's ``Shard(0)`` split of a ROWS x COLS parameter over ``n`` ranks: each rank's rows, carrying
    ``noise_span`` as ``local_shard`` sets it."""
    rows = -(-ROWS // n)
    out = []
    for r in range(n):
        lo, hi = min(r * rows, ROWS), min((r + 1) * rows, ROWS)
        q = torch.zeros(hi - lo, COLS, dtype=dtype, device=device)
        q.noise_span = (lo * COLS, ROWS * COLS)
        out.append(q)
    return out


def clock(device: str = "cpu"):
    """The process's CPU time on the CPU (robust to other processes on a shared machine; one torch thread),
    wall time on a GPU."""
    return time.process_time if device == "cpu" else time.perf_counter


def counted(fn, device: str = "cpu") -> tuple[float, int]:
    """(seconds, elements the generators produced) of ``fn()``."""
    import lowmem.optim.zo_keyed as K

    drawn, fill = [0], K.fill_chunk_

    def count(out, seed, kind):
        drawn[0] += out.numel()
        fill(out, seed, kind)

    K.fill_chunk_ = count
    sync, now = torch.cuda.synchronize if device != "cpu" else (lambda: None), clock(device)
    try:
        sync()
        start = now()
        fn()
        sync()
        return now() - start, drawn[0]
    finally:
        K.fill_chunk_ = fill


def draw(kind: str, like: torch.Tensor, whole: bool) -> None:
    """Rank ``like``'s z: keyed, or (``whole``) the replaced rule: the whole parameter's z, then the slice."""
    from lowmem.optim.zo_noise import Noise

    if whole:
        start = like.noise_span[0]
        whole_like = torch.empty((), device=like.device).expand(ROWS, COLS)
        Noise(kind).view(whole_like, 99).reshape(-1)[start:start + like.numel()]
    else:
        Noise(kind).view(like, 99)


def worker_rss(kind: str, n: int, whole: bool) -> dict:
    """In a fresh process: the peak RSS that drawing rank 0's z adds (output and temporaries)."""
    from lowmem.memory import current_rss_bytes, fix_malloc_threshold, reset_peak_rss, window_peak_rss_bytes

    fix_malloc_threshold()
    like = shard_standins(n)[0]
    draw(kind, shard_standins(n)[-1], whole)  # warm-up on another rank's rows (imports, tables), then freed
    import lowmem.optim.zo_noise as zo_noise

    zo_noise._local.__dict__.clear()  # the warm-up's scratch buffer
    base = current_rss_bytes()
    reset_peak_rss()
    draw(kind, like, whole)
    return {"added_mib": (window_peak_rss_bytes() - base) / 2**20}


def worker_step(model: str, chunk: int | None, steps: int) -> dict:
    """In a fresh process (the tree on PYTHONPATH): the median MeZO step time on ``model``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem.optim.mezo import MeZO

    if chunk:
        import lowmem.optim.zo_keyed as K

        K.CHUNK = chunk
    m = MODELS[model]
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=m["hidden"], intermediate_size=2 * m["hidden"],
                               num_hidden_layers=m["layers"], num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=m["vocab"])
    net = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=torch.Generator().manual_seed(0))
    opt = MeZO(net.parameters(), lr=0.0)
    loss = lambda: net(input_ids=ids, labels=ids).loss  # noqa: E731
    opt.step(loss)
    times = []
    for _ in range(steps * m["repeat"]):
        start = clock()()
        opt.step(loss)
        times.append(clock()() - start)
    return {"step_s": statistics.median(times)}


def chunk_sweep(rounds: int, device: str) -> str:
    import lowmem.optim.zo_keyed as K

    name = "CHUNK" if device == "cpu" else "ACCEL_CHUNK"  # the chunk of this device type
    chunks = CHUNKS if device == "cpu" else ACCEL_CHUNKS
    like, seconds = torch.empty(ROWS, COLS, device=device), {c: [] for c in chunks}
    default = getattr(K, name)
    try:
        for _ in range(rounds):
            for c in chunks:
                setattr(K, name, c)
                seconds[c].append(counted(lambda: draw("gaussian", like, whole=False), device)[0])
        rows = []
        for c in chunks:
            setattr(K, name, c)
            drawn = max(counted(lambda: draw("gaussian", q, whole=False))[1] for q in shard_standins(4, device))
            base = statistics.median(seconds[default])
            rows.append([f"2^{c.bit_length() - 1}" + (" (chosen)" if c == default else ""),
                         f"{statistics.median(seconds[c]) * 1e3:.1f}", f"{statistics.median(seconds[c]) / base:.2f}",
                         f"{drawn / 1e6:.3f}", f"{drawn / (ROWS * COLS / 4):.3f}"])
    finally:
        setattr(K, name, default)
    return markdown_table(["chunk (elements)", "whole z, 1 process: ms (median; CPU time on the CPU)", "vs the chosen chunk",
                           "rank of 4: M elements drawn (max)", "vs its shard"], rows)


def cuda_added_mib(kind: str, q: torch.Tensor, whole: bool) -> float:
    """The CUDA memory that drawing ``q``'s z adds at its peak (output and temporaries)."""
    import lowmem.optim.zo_noise as zo_noise

    zo_noise._local.__dict__.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    draw(kind, q, whole)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def per_rank(rounds: int, device: str) -> str:
    rows = []
    for kind in KINDS:
        for n in (1, 2, 4):
            for whole in (True, False):
                q = shard_standins(n, device)[0]
                runs = [counted(lambda: draw(kind, q, whole), device) for _ in range(rounds)]
                rss = {"added_mib": cuda_added_mib(kind, q, whole)} if device != "cpu" else \
                    run_json([sys.executable, __file__, "--worker", "rss", kind, str(n), str(int(whole)), f"{ROWS}x{COLS}"],
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
                rows.append([kind, n, "whole z, sliced (before)" if whole else "keyed chunks (after)",
                             f"{statistics.median(t for t, _ in runs) * 1e3:.1f}",
                             f"{runs[0][1] / 1e6:.3f}" if kind != "philox" else f"({q.numel() / 1e6:.3f})" if not whole
                             else f"({ROWS * COLS / 1e6:.3f})",
                             f"{rss['added_mib']:.1f}"])
    memory = "peak RSS added (MiB, fresh process)" if device == "cpu" else f"peak {device} memory added (MiB)"
    time_of = "rank 0: CPU ms (median)" if device == "cpu" else "rank 0: ms (median)"
    return markdown_table(["kind", "N", "rule", time_of, "M elements generated", memory], rows)


def step_times(before: str | None, rounds: int, steps: int) -> str:
    variants = {f"after, chunk 2^{c.bit_length() - 1}": (str(ROOT), c) for c in (1 << 15, 1 << 16, 1 << 17)}
    with tempfile.TemporaryDirectory() as tmp:
        if before:
            subprocess.run(f"git -C {ROOT} archive {before} lowmem offload | tar -x -C {tmp}", shell=True, check=True)
            variants = {f"before ({before})": (tmp, 0), **variants}
        times = {(m, v): [] for m in MODELS for v in variants}
        for _ in range(rounds):
            for m in MODELS:
                for v, (tree, chunk) in variants.items():
                    out = run_json([sys.executable, __file__, "--worker", "step", m, str(chunk), str(steps)],
                                   env={**os.environ, "PYTHONPATH": tree})
                    times[(m, v)].append(out["step_s"])
    rows = []
    for m in MODELS:
        ref = times[(m, next(iter(variants)))]
        for v in variants:
            t = times[(m, v)]
            rows.append([m, v, f"{statistics.median(t) * 1e3:.2f}", f"{min(t) * 1e3:.2f}-{max(t) * 1e3:.2f}",
                         f"{statistics.median(a / b for a, b in zip(t, ref)):.3f}"])
    return markdown_table(["model", "tree", "MeZO step, CPU ms (median of rounds)", "min-max",
                           "vs first row (same rounds)"], rows)


def main() -> None:
    global ROWS, COLS
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        what, *rest = sys.argv[2:]
        if what == "rss":
            ROWS, COLS = map(int, rest[3].split("x"))
            print(json.dumps(worker_rss(rest[0], int(rest[1]), bool(int(rest[2])))))
        else:
            print(json.dumps(worker_step(rest[0], int(rest[1]), int(rest[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="git ref of the tree to compare the MeZO step with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cuda: the chunk sweep (ACCEL_CHUNK) and the per-rank "
                        "draw on the GPU, no MeZO step table; the section is written as zo_keyed_<device>")
    parser.add_argument("--shape", default=f"{ROWS}x{COLS}", help="the parameter, ROWSxCOLS (on a GPU: larger "
                        "than ACCEL_CHUNK, e.g. 8191x4096)")
    args = parser.parse_args()
    ROWS, COLS = map(int, args.shape.split("x"))
    load0 = os.getloadavg()[0]
    sweep, ranks = chunk_sweep(3 * args.rounds, args.device), per_rank(args.rounds, args.device)
    steps = step_times(args.before, args.rounds, args.steps) if args.device == "cpu" else None
    load1 = os.getloadavg()[0]
    on = "" if args.device == "cpu" else f" on {args.device}"
    write_result("zo_keyed" + ("" if args.device == "cpu" else f"_{args.device}"),
                 f"ZO noise keyed by position{on}: per-rank draw under FSDP2, chunk size, MeZO step",
                 f"### Chunk size: whole z of a {ROWS} x {COLS} parameter (gaussian{on})\n\n{sweep}\n\n"
                 f"### Per rank, N processes ({ROWS} x {COLS} fp32 parameter, rank 0's rows)\n\n{ranks}\n\n"
                 + (f"### Single-process MeZO step (gaussian, 1 thread)\n\n{steps}\n" if steps else ""),
                 f"Load average at the start / end: {load0:.1f} / {load1:.1f} (2 cores shared with other work: "
                 f"compare within a table, rounds interleaved; on the CPU the times are the process's CPU time, "
                 f"less sensitive to the other work than wall time). At N = 1 both rules draw the whole z (the "
                 f"same code): their difference is the measurement's noise. Torch threads: "
                 f"{torch.get_num_threads()}. philox "
                 f"generates at its positions (no chunks; its elements in parentheses); on CPU it is the int64 "
                 f"reference of the GPU kernel.")


if __name__ == "__main__":
    main()
