"""Packing without cross-document attention (issue 29), measured in one run.

1. **Eval loss before fine-tuning of the default LM recipe** (SmolLM2-135M-Instruct, BBC News eval split,
   rows of ``train.seq_len`` packed by :func:`lowmem.data.pack_tokens`), fp32, three ways:
   * *cross-document attention, every target* -- the rows as lowmem fed them before (no ``position_ids``,
     ``labels = input_ids``): each document attends to the one before it in the row;
   * *cross-document attention, same targets* -- as now, but without ``position_ids``: isolates the mask;
   * *documents apart* -- :func:`lowmem.data.lm_rows`: positions restart at each document (block-diagonal
     causal mask), a document's first token is not predicted from the one before.
2. **Tokens per second of the SFT recipe** (``recipes/sft-smollm2.yaml``, the trainer's own step): packed
   rows against one example per row padded to the longest of its micro-batch (``data.packing: false``), at the
   recipe's batch size and at the batch size that holds about as many examples as a packed micro-batch.
   Tokens are non-padding tokens; the first step of each mode is a warm-up, not timed.

Usage: python benchmarks/bench_packing.py [--rows 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


@torch.no_grad()
def eval_losses(rows: int, batch: int = 8) -> list[list]:
    from lowmem.data import lm_rows, pack_tokens, split_documents
    from lowmem.models import load_model, load_tokenizer
    from lowmem.objectives import causal_lm_loss
    from lowmem.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    tokenizer, model = load_tokenizer(recipe.model), load_model(recipe.model).eval()
    _, eval_docs = split_documents(recipe.data, recipe.train.seed)
    packed = pack_tokens(eval_docs, tokenizer, recipe.train.seq_len, "data.path")[:rows]
    apart = lm_rows(packed, tokenizer.eos_token_id)
    ways = {"cross-document attention, every target (before issue 29)": {"input_ids": packed, "labels": packed},
            "cross-document attention, same targets": {k: apart[k] for k in ("input_ids", "labels")},
            "documents apart (position_ids restart; lowmem now)": apart}
    out = []
    for name, data in ways.items():
        total = count = 0.0
        for i in range(0, len(packed), batch):
            b = {k: v[i:i + batch] for k, v in data.items()}
            n = (b["labels"][:, 1:] != -100).sum().item()
            total, count = total + causal_lm_loss(model, b).item() * n, count + n
        out.append([name, f"{total / count:.4f}", int(count)])
        print(out[-1], flush=True)
    docs_per_row = (apart["position_ids"] == 0).sum().item() / len(packed)
    return out, len(packed), recipe.train.seq_len, docs_per_row


def sft_speed(packing: bool, batch_size: int, steps: int) -> list:
    from lowmem.recipe import load_recipe
    from lowmem.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench-packing-") as out:
        recipe = load_recipe(ROOT / "recipes" / "sft-smollm2.yaml",
                             [f"data.packing={str(packing).lower()}", f"train.batch_size={batch_size}",
                              f"train.steps={steps}", f"output.dir={out}"])
        trainer = Trainer(recipe, progress=False)
        trainer.train_step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            trainer.train_step()
        seconds = time.perf_counter() - t0
    batches = trainer.run.train_batches
    tokens = batches.tokens_per_batch() * (steps - 1)
    width = recipe.train.seq_len if packing else "longest of the batch"
    row = ["packed rows" if packing else "one example per row, padded", batch_size, width,
           f"{batches.tokens_per_batch():.0f}", f"{tokens / seconds:.1f}", load_avg()]
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="eval rows of the default recipe")
    parser.add_argument("--steps", type=int, default=4, help="SFT steps per mode (the first is not timed)")
    parser.add_argument("--quick", action="store_true", help="16 rows, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.steps = 16, 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    losses, n_rows, seq, docs_per_row = eval_losses(args.rows)
    speed = [sft_speed(True, 2, args.steps), sft_speed(False, 2, args.steps), sft_speed(False, 6, args.steps)]
    table = (markdown_table(["default LM recipe, eval split, before fine-tuning", "eval loss", "targets"], losses)
             + "\n\n" + markdown_table(["SFT recipe (recipes/sft-smollm2.yaml)", "batch size", "row width",
                                        "tokens per micro-batch (no padding)", "tokens/s", "load average (1, 5, 15 min)"],
                                       speed))
    write_result("packing", "Packing without cross-document attention: eval loss and SFT tokens/s (issue 29)", table,
                 notes=(f"Eval loss: the first {n_rows} packed rows of {seq} tokens of the default recipe's eval "
                        f"split ({docs_per_row:.2f} document starts a row, counting a row's first token), fp32, "
                        "mean over target tokens. Tokens/s: the trainer's step with the recipe's settings (AdamW, "
                        f"bf16 autocast where the CPU has AVX-512), {args.steps - 1} timed steps per mode after one "
                        "warm-up; this machine is shared, so its load average is given beside each figure."))


if __name__ == "__main__":
    main()
