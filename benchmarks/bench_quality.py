"""Quality at equal steps: the offline default fine-tune (SmolLM2-135M on BBC News) per method.

Each method is one ``lowmem-train recipes/default.yaml`` run in a fresh process with the same
data order, steps and schedule; only the optimizer (and its LR) or the activation sampler
changes. Reported: eval loss before/after, the ratio to AdamW's final eval loss, optimizer-state
MiB (from the optimizer's own tensors), peak RSS and wall time.

    python benchmarks/bench_quality.py [--steps 30] [--only adamw apollo_mini] [--reuse] [--val]

``--val`` runs on a validation split for LR sweeps: the training documents of the default split
(the test documents are never read), of which 5% are held out by the same seeded rule.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "quality"

# method -> recipe overrides (LRs: the papers' fine-tuning settings scaled to this short run; not tuned)
METHODS: dict[str, list[str]] = {
    "adamw": ["optim.name=adamw", "optim.lr=1e-4", "optim.args={}"],
    "apollo_mini": ["optim.name=apollo_mini", "optim.lr=1e-4", "optim.args={scale_front: true}"],
    "apollo_mini 8-bit layer-wise": ["optim.name=apollo_mini", "optim.lr=1e-4", "optim.layerwise=true",
                                     "optim.max_grad_norm=null", "optim.args={scale_front: true, state_bits: 8}"],
    "galore_adamw r128": ["optim.name=galore_adamw", "optim.lr=4e-4",
                          "optim.args={rank: 128, update_proj_gap: 200, scale: 0.25}"],
    "apollo r128": ["optim.name=apollo", "optim.lr=1e-4", "optim.args={rank: 128, update_proj_gap: 200, scale: 1}"],
    # sqrt(scale) multiplies APOLLO's update (apollo-torch's scale; Zhu et al. 2024, arXiv 2412.05270, Algorithm 1);
    # scale 4 doubles it, fine-tuning refs use up to 32
    "apollo r128 scale 4": ["optim.name=apollo", "optim.lr=1e-4",
                            "optim.args={rank: 128, update_proj_gap: 200, scale: 4}"],
    "frugal rho=0.25": ["optim.name=frugal", "optim.lr=1e-4", "optim.args={density: 0.25, update_proj_gap: 200}"],
    "adamw + wta_crs 0.3": ["optim.name=adamw", "optim.lr=1e-4", "optim.args={}", "activations.wta_crs={keep_ratio: 0.3}"],
    "adamw + lean": ["optim.name=adamw", "optim.lr=1e-4", "optim.args={}", "activations.lean=true"],
    "adamw + lean + wta_crs 0.3": ["optim.name=adamw", "optim.lr=1e-4", "optim.args={}", "activations.lean=true",
                                   "activations.wta_crs={keep_ratio: 0.3}"],
    "adamw8bit": ["optim.name=adamw8bit", "optim.lr=1e-4", "optim.weight_decay=0", "optim.args={}"],
    "galore_adamw r128 8-bit": ["optim.name=galore_adamw", "optim.lr=4e-4",
                                "optim.args={rank: 128, update_proj_gap: 200, scale: 0.25, state_bits: 8}"],
    "apollo r128 8-bit": ["optim.name=apollo", "optim.lr=1e-4",
                          "optim.args={rank: 128, update_proj_gap: 200, scale: 1, state_bits: 8}"],
}
# LR sweeps (issue 15): run with --val, then the best of each on the test split. SWAN/SinkGD: optim.lr is
# AdamW's (embeddings, norms, lm_head), lr_scale sets the block matrices' lr * lr_scale.
SWEEP = {"adamw": ["1e-4", "3e-4"], "apollo_mini": ["1e-4", "3e-4"], "sgd_sai": ["3e-5", "1e-4", "3e-4"],
         "sinkgd": ["0.3", "1", "3"], "swan": ["0.3", "1", "3"]}
for _lr in SWEEP["adamw"]:
    METHODS[f"adamw lr={_lr}"] = ["optim.name=adamw", f"optim.lr={_lr}", "optim.args={}"]
for _lr in SWEEP["apollo_mini"]:
    METHODS[f"apollo_mini lr={_lr}"] = ["optim.name=apollo_mini", f"optim.lr={_lr}", "optim.args={scale_front: true}"]
for _lr in SWEEP["sgd_sai"]:
    METHODS[f"sgd_sai lr={_lr}"] = ["optim.name=sgd_sai", f"optim.lr={_lr}", "optim.args={}"]
    METHODS[f"sgd_sai lr={_lr} 8-bit layer-wise"] = ["optim.name=sgd_sai", f"optim.lr={_lr}", "optim.layerwise=true",
                                                     "optim.max_grad_norm=null", "optim.args={state_bits: 8}"]
for _name in ("sinkgd", "swan"):
    for _s in SWEEP[_name]:
        METHODS[f"{_name} lr_scale={_s}"] = [f"optim.name={_name}", "optim.lr=1e-4", f"optim.args={{lr_scale: {_s}}}"]
        METHODS[f"{_name} lr_scale={_s} layer-wise"] = [f"optim.name={_name}", "optim.lr=1e-4", "optim.layerwise=true",
                                                        "optim.max_grad_norm=null", f"optim.args={{lr_scale: {_s}}}"]


def validation_data() -> Path:
    """The default split's training documents as one JSONL file (the test documents left out)."""
    from lowmem.data import split_documents
    from lowmem.recipe import load_recipe

    path = RUNS.parent / "quality_val" / "train_documents.jsonl"
    if not path.exists():
        recipe = load_recipe(ROOT / "recipes" / "default.yaml")
        train, _ = split_documents(recipe.data, recipe.train.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in train))
    return path


def run(method: str, overrides: list[str], steps: int, reuse: bool, val: bool = False,
        precision: str = "bf16") -> dict:
    runs = RUNS.parent / "quality_val" if val else RUNS
    out = runs / (method.replace(" ", "_").replace("=", "").replace("+", "") + ("" if precision == "bf16" else "_fp32"))
    if val:
        overrides = [*overrides, f"data.path={validation_data()}"]
    if reuse and (out / "summary.json").exists():  # a finished run of the same length: keep it
        summary = json.loads((out / "summary.json").read_text())
        if summary["steps"] == steps:
            return summary
    cmd = [sys.executable, "-m", "lowmem.cli", str(ROOT / "recipes" / "default.yaml"), *overrides,
           f"train.mixed_precision={precision}", f"train.steps={steps}", f"train.eval_every={max(1, steps // 3)}",
           "train.checkpoint_every=0",
           "output.save_model=false", f"output.dir={out}", "--quiet", "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", default=None, help="method names (default: all)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of the same length")
    parser.add_argument("--val", action="store_true", help="validation split (LR sweeps), not the test split")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"],
                        help="train.mixed_precision (no: fp32, for a CPU without AVX-512, where bf16 matmuls are slow)")
    args = parser.parse_args()
    chosen = [m for m in METHODS if args.only is None or m in args.only]
    results = {m: run(m, METHODS[m], args.steps, args.reuse, args.val, args.precision) for m in chosen}
    plain_adamw = [r["eval_loss"] for m, r in results.items() if m == "adamw" or m.startswith("adamw lr=")]
    base = min(plain_adamw, default=None)  # AdamW at its best LR among the rows
    rows = [[m, f"{r['eval_loss_before']:.4f}", f"{r['eval_loss']:.4f}",
             f"{r['eval_loss'] / base:.4f}" if base else "-", f"{r['optimizer_state_mb']:.1f}",
             f"{r['peak_rss_gb']:.2f}", f"{r['wall_time_s']:.0f}"] for m, r in results.items()]
    table = markdown_table(["method", "eval loss before", "eval loss after", "/ AdamW", "optimizer state MiB",
                            "peak RSS GiB", "train wall s"], rows)
    kind = "LR sweep on the validation split" if args.val else "Quality"
    autocast = "bf16 autocast" if args.precision == "bf16" else "fp32 (no autocast)"
    write_result(("quality_val" if args.val else "quality") + ("" if args.precision == "bf16" else "_fp32"),
                 f"{kind}: default fine-tune (SmolLM2-135M, BBC News), {args.steps} steps per method, {autocast}",
                 table, notes=f"Same data order, schedule (cosine, 3 warmup steps) and {autocast} for every "
                              "method; eval on 4 held-out batches of 4x128 tokens. Loss curves: runs/quality/*/metrics.jsonl.")


if __name__ == "__main__":
    main()
