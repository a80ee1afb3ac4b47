"""ZO2 offload engine vs in-memory MeZO: step time, bytes moved, peak GPU memory.

    python benchmarks/bench_zo2.py                 # CPU: small model, ZO2 host / NVMe tiers vs MeZO
    python benchmarks/bench_zo2.py --gpu           # CUDA: OPT-30B / Llama-3-8B shapes (fp16, random init),
                                                   #       overhead vs in-GPU MeZO on OPT-1.3B
    python benchmarks/bench_zo2.py --gpu --nvme-dir /nvme/zo2 --host-gb 16   # with the NVMe tier

Bytes per step: each block crosses PCIe once per direction (ZO2), in its host encoding
(``offload.host_dtype``: the training dtype, bf16, or int8 with one fp32 scale per 256 weights);
counted here at the store, every host->device fetch and device->host write of a timed step. The
PCIe bound is those bytes divided by the measured pinned host->device bandwidth. Model shapes come
from configs (no download).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from _common import markdown_table, write_result
from lowmem.offload.engine import ZO2Engine
from lowmem.optim import create_optimizer

SHAPES = {  # name -> (model_type, config kwargs)
    "opt-30b": ("opt", dict(hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56,
                            word_embed_proj_dim=7168, vocab_size=50272, max_position_embeddings=2048)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=8192, tie_word_embeddings=False)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                             word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048)),
    "cpu-small": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512)),
}


def build(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """Model from a config on the CPU (the engine moves what stays resident), with cheap initialisation
    (:func:`gpu_proof_common.host_model`: one random pool, no per-tensor init of 30B parameters)."""
    from gpu_proof_common import host_model

    model_type, kw = SHAPES[name]
    return host_model({"model_type": model_type, **kw}, dtype)


def batch(vocab: int, bsz: int, seq: int) -> dict:
    ids = torch.randint(0, vocab, (bsz, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def timed(fn, steps: int, cuda: bool) -> float:
    fn()  # warm-up (first uploads, allocator)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def h2d_bandwidth(nbytes: int = 1 << 30) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - start)


def run_zo2(name, dtype, data, device, config: dict, steps: int):
    """(step s, host->device bytes per step, device->host bytes per step, peak GiB, largest block GiB)."""
    from gpu_proof_common import Traffic

    model = build(name, dtype)
    opt = create_optimizer(model, "mezo", lr=1e-7, eps=1e-3)
    engine = ZO2Engine(model, opt, config, device=device)
    traffic = Traffic(engine)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = timed(lambda: engine.step(data), steps, cuda)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    block_gb = max(pk.numel for pk in engine.packed) * torch.empty((), dtype=dtype).element_size() / 2**30
    # the timed steps and the warm-up, not close's flush
    up, down = traffic.up / (steps + 1), traffic.down / (steps + 1)
    engine.close()
    return t, up, down, peak, block_gb


def run_mezo(name, dtype, data, device, steps: int) -> float:
    model = build(name, dtype).to(device).eval()
    opt = create_optimizer(model, "mezo", lr=1e-7, eps=1e-3)
    data = {k: v.to(device) for k, v in data.items()}
    return timed(lambda: opt.step(lambda: model(**data).loss), steps, device == "cuda")


HOST_COPIES = [("fp32 host", {}), ("bf16 host", {"host_dtype": "bfloat16"}), ("int8 host", {"host_dtype": "int8"})]


def cpu_main(steps: int) -> None:
    data = batch(SHAPES["cpu-small"][1]["vocab_size"], 4, 64)
    mezo = run_mezo('cpu-small', torch.float32, data, 'cpu', steps)
    rows = [["in-memory MeZO", f"{mezo * 1e3:.0f}", "0", "0", "-"]]
    with tempfile.TemporaryDirectory() as nvme:
        for tier, tier_cfg in [("host tier", {}), ("NVMe tier (tmp dir)", {"nvme_dir": nvme,
                                                                           "host_memory_budget_gb": 0.0})]:
            for label, cfg in HOST_COPIES:
                t, up, down, _, _ = run_zo2("cpu-small", torch.float32, data, "cpu", {**tier_cfg, **cfg}, steps)
                rows.append([f"ZO2 {tier}, {label}", f"{t * 1e3:.0f}", f"{up / 2**20:.2f}", f"{down / 2**20:.2f}",
                             f"{t / mezo:.2f}x"])
    write_result("zo2", "ZO2 offload vs in-memory MeZO (CPU, small Llama-shaped model)",
                 markdown_table(["run", "step ms", "MiB host->device/step", "MiB device->host/step", "vs MeZO"],
                                rows),
                 notes="cpu-small: 8 layers, hidden 256, fp32 training, batch 4x64. On CPU the 'device' is the CPU, "
                       "so the copies are memcpy and nothing overlaps; the figures measure the engine's overhead "
                       "(a bf16 or int8 host copy adds its encoding and decoding on the CPU, which a GPU does "
                       "beside a PCIe copy it halves). Bytes are counted at the store during the timed steps. "
                       f"Load average at the start: {os.getloadavg()[0]:.1f}.")


def gpu_main(steps: int, nvme_dir: str | None, host_gb: float | None) -> None:
    bw = h2d_bandwidth()
    rows = []
    for name, host in [("opt-30b", None), ("llama-3-8b", None), ("llama-3-8b", "int8")]:
        data = batch(SHAPES[name][1]["vocab_size"], 1, 512)
        cfg = {"nvme_dir": nvme_dir, "host_memory_budget_gb": host_gb} if nvme_dir else {}
        t, up, down, peak, block_gb = run_zo2(name, torch.float16, data, "cuda", {**cfg, "host_dtype": host}, steps)
        moved = up + down
        bound = moved / bw
        rows.append([name, host or "fp16", f"{peak:.2f}", f"{peak / block_gb:.1f}", f"{t:.2f}",
                     f"{moved / 2**30:.1f}", f"{bound:.2f}", f"{t / bound:.2f}"])
    data = batch(50272, 4, 512)
    t_mezo = run_mezo("opt-1.3b", torch.float16, data, "cuda", steps)
    t_zo2 = run_zo2("opt-1.3b", torch.float16, data, "cuda", {}, steps)[0]
    write_result("zo2_gpu", "ZO2 on one GPU (fp16, random init; batch 1x512)",
                 markdown_table(["model", "host copy", "peak GPU GiB", "peak / block", "step s", "GiB moved/step",
                                 "PCIe bound s", "step / bound"], rows),
                 notes=f"H2D bandwidth (pinned): {bw / 2**30:.1f} GiB/s. Overhead vs in-GPU MeZO on OPT-1.3B "
                       f"(batch 4x512): {t_zo2 / t_mezo:.2f}x ({t_zo2:.3f} s vs {t_mezo:.3f} s)."
                       + (f" NVMe tier: {nvme_dir}, host budget {host_gb} GB." if nvme_dir else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the CUDA benchmarks (large model shapes)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nvme-dir", default=None)
    parser.add_argument("--host-gb", type=float, default=None)
    args = parser.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
        gpu_main(args.steps, args.nvme_dir, args.host_gb)
    else:
        cpu_main(args.steps)


if __name__ == "__main__":
    main()
