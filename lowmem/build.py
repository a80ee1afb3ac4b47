"""Build everything a run needs from a recipe: model, tokenizer, data, optimizer, schedule, samplers.

One function per part, composed by :func:`build_run`; the trainer only sees the :class:`Run`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from lowmem.activations import apply_activations
from lowmem.data import (CandidateBatches, block_diagonal_mask, PackedBatches, PaddedBatches, held_out_batches, label_examples,
                         lm_examples, lm_rows, pack_examples, pack_tokens, split_documents)
from lowmem.models import load_model, load_tokenizer
from lowmem.objectives import CandidateCollator, causal_lm_loss, classification_loss, lm_body_and_head
from lowmem.optim.targets import block_container
from lowmem.optim.registry import accepted_hparams, create_optimizer, get_spec
from lowmem.recipe import Recipe, TrainSection
from lowmem.sft import sft_examples
from lowmem.steps import Step, make_step


def lm_metrics(model, batch, chunk_tokens: int | None = None) -> dict[str, torch.Tensor]:
    return {"eval_loss": causal_lm_loss(model, batch, chunk_tokens)}


def lm_loss(train: TrainSection) -> Callable:
    """The run's ``(model, batch) -> loss`` for ``data.task: lm`` (chunked by ``train.loss_chunk_tokens``)."""
    return functools.partial(causal_lm_loss, chunk_tokens=train.loss_chunk_tokens)


def classification_metrics(model, batch) -> dict[str, torch.Tensor]:
    loss, accuracy = classification_loss(model, batch)
    return {"eval_loss": loss, "eval_accuracy": accuracy}


@dataclass
class Run:
    stepper: Step            # how a step runs (lowmem.steps): model, optimizer, loss, eval, checkpoint parts
    tokenizer: object
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_batches: PackedBatches
    eval_batches: list[dict[str, torch.Tensor]]
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    data_counts: dict[str, int] = field(default_factory=dict)  # examples read, truncated, dropped (summary.json)

    @property
    def model(self) -> torch.nn.Module:
        return self.stepper.model

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """What a checkpoint saves and the scheduler drives."""
        return self.stepper.inner_optimizer

    def save_model(self, model: torch.nn.Module, directory: Path) -> None:
        model.config.use_cache = True  # off for training (lowmem.models.load_model); generation wants it
        model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.lr_schedule`` as transformers' scheduler (linear warmup from 0 over ``warmup_steps``, then):
    constant -> ``get_constant_schedule_with_warmup``; linear -> ``get_polynomial_decay_schedule_with_warmup``
    with power 1 down to ``min_lr_ratio`` (``get_linear_schedule_with_warmup`` when it is 0); cosine ->
    ``get_cosine_with_min_lr_schedule_with_warmup`` with ``min_lr_rate = min_lr_ratio``."""
    import transformers.optimization as sched

    warm, total, floor = train.warmup_steps, train.steps, train.min_lr_ratio
    if train.lr_schedule == "constant" or floor == 1.0:
        return sched.get_constant_schedule_with_warmup(optimizer, warm)
    if train.lr_schedule == "cosine":
        return sched.get_cosine_with_min_lr_schedule_with_warmup(optimizer, warm, total, min_lr_rate=floor)
    if floor == 0.0:
        return sched.get_linear_schedule_with_warmup(optimizer, warm, total)
    lr = optimizer.defaults["lr"]  # the polynomial schedule takes the end LR in absolute terms
    return sched.get_polynomial_decay_schedule_with_warmup(optimizer, warm, total, lr_end=lr * floor, power=1.0)


def classification_train_loss(model, batch) -> torch.Tensor:
    return classification_loss(model, batch)[0]


# data.task -> (train.* -> (loss_fn, eval_fn)): the run's objective, also what the planner traces
OBJECTIVES = {
    "lm": lambda tr: (lm_loss(tr), functools.partial(lm_metrics, chunk_tokens=tr.loss_chunk_tokens)),
    "sft": lambda tr: (lm_loss(tr), functools.partial(lm_metrics, chunk_tokens=tr.loss_chunk_tokens)),
    "classification": lambda tr: (classification_train_loss, classification_metrics),
}


def objective(recipe: Recipe) -> tuple[Callable, Callable]:
    """``(loss_fn, eval_fn)`` of ``data.task``: ``(model, batch) -> loss`` and ``-> {"eval_loss": ...}``."""
    return OBJECTIVES[recipe.data.task](recipe.train)


def candidate_collator(recipe: Recipe, tokenizer) -> CandidateCollator:
    """The collator of ``data.task: classification`` (rows of at most ``train.seq_len`` tokens)."""
    cls = recipe.data.classification
    return CandidateCollator(tokenizer, [cls.candidates[k] for k in cls.candidates], cls.template,
                             recipe.train.seq_len)


def _batches(recipe: Recipe, tokenizer, train, held):
    """Train batches and eval batches of ``lm_rows``-style packed rows (dicts) or of examples (lists):
    examples are packed (``data.packing``) or padded per micro-batch."""
    tr, pad = recipe.train, tokenizer.pad_token_id
    if isinstance(train, list) and recipe.data.packing:
        train = pack_examples(train, tr.seq_len, pad, "data.path")
        held = pack_examples(held, tr.seq_len, pad, recipe.data.eval_path or "data.path (eval split)")
    batches = PackedBatches(train, tr.batch_size, tr.seed) if isinstance(train, dict) \
        else PaddedBatches(train, pad, tr.batch_size, tr.seed)
    return batches, held_out_batches(held, tr.batch_size, tr.eval_batches, pad)


def _lm_data(recipe: Recipe, tokenizer):
    tr = recipe.train
    train_docs, eval_docs = split_documents(recipe.data, tr.seed)
    if recipe.data.packing:
        train = lm_rows(pack_tokens(train_docs, tokenizer, tr.seq_len, "data.path"), tokenizer.eos_token_id)
        held = lm_rows(pack_tokens(eval_docs, tokenizer, tr.seq_len, recipe.data.eval_path or "data.path (eval split)"),
                       tokenizer.eos_token_id)
        return (*_batches(recipe, tokenizer, train, held), {"documents": len(train_docs)})
    (train, cut), (held, _) = lm_examples(train_docs, tokenizer, tr.seq_len), lm_examples(eval_docs, tokenizer, tr.seq_len)
    return (*_batches(recipe, tokenizer, train, held), {"documents": len(train_docs), "truncated": cut})


def _sft_data(recipe: Recipe, tokenizer):
    """Examples of ``data.path`` in a seeded order; the held-out ones from ``data.eval_path`` or a split."""
    d, tr = recipe.data, recipe.train
    examples, counts = sft_examples(d.path, "data.path", tokenizer, d.sft, tr.seq_len)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(tr.seed)).tolist()
    examples = [examples[i] for i in order][: d.max_documents]
    if d.eval_path is not None:
        held, _ = sft_examples(d.eval_path, "data.eval_path", tokenizer, d.sft, tr.seq_len)
    else:
        n_eval = max(1, round(len(examples) * d.eval_fraction))
        if n_eval >= len(examples):
            raise ValueError(f"data.path: {len(examples)} example(s) are too few to hold out an eval split")
        held, examples = examples[:n_eval], examples[n_eval:]
    return (*_batches(recipe, tokenizer, examples, held), {**counts, "train_examples": len(examples)})


def _classification_data(recipe: Recipe, tokenizer):
    tr = recipe.train
    train_docs, eval_docs = split_documents(recipe.data, tr.seed)
    labels = list(recipe.data.classification.candidates)
    collator = candidate_collator(recipe, tokenizer)
    train = label_examples(train_docs, labels, recipe.data.path)
    held = label_examples(eval_docs, labels, recipe.data.eval_path or recipe.data.path)
    held = held[: tr.eval_batches * tr.batch_size]
    evals = [collator(held[i:i + tr.batch_size]) for i in range(0, len(held), tr.batch_size)]
    return CandidateBatches(train, collator, tr.batch_size, tr.seed), evals, {"documents": len(train)}


DATA_BUILDERS = {"lm": _lm_data, "sft": _sft_data, "classification": _classification_data}


def build_data(recipe: Recipe, tokenizer):
    """Return (train batches, eval batches, counts, loss_fn, eval_fn) for ``data.task``."""
    return (*DATA_BUILDERS[recipe.data.task](recipe, tokenizer), *objective(recipe))


class _MaskCaught(Exception):
    pass


@torch.no_grad()
def mask_ignores_positions(model) -> bool:
    """Whether ``model`` would let packed documents attend to each other: its first decoder block is called on
    two 2-token documents (``position_ids`` 0 1 0 1) and the mask it receives is read (the forward stops
    there). transformers builds a block-diagonal mask from restarting positions for most models (Llama,
    Qwen, Gemma, GPT-2); OPT's mask ignores them. Flash attention reads the positions itself."""
    found = block_container(model)
    if found is None or "flash" in str(getattr(model.config, "_attn_implementation", "")):
        return False
    caught = {}

    def grab(module, args, kwargs):
        masks = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 4
                 and tuple(a.shape[-2:]) == (4, 4)]
        caught["mask"] = masks[0] if masks else None
        raise _MaskCaught

    hook = found[1][0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device),
              position_ids=torch.tensor([[0, 1, 0, 1]], device=device), use_cache=False)
    except _MaskCaught:
        pass
    finally:
        hook.remove()
    mask = caught.get("mask")
    if mask is None:
        return True
    allowed = mask[0, 0, 2, 1]  # token 0 of document 2 looking at token 1 of document 1
    return bool(allowed) if mask.dtype == torch.bool else bool(allowed == 0)


def keep_documents_apart(model, train_batches, eval_batches: list[dict]) -> None:
    """Give packed batches an explicit block-diagonal mask where ``model``'s own would ignore positions."""
    if not isinstance(train_batches, PackedBatches) or not mask_ignores_positions(model):
        return
    train_batches.block_mask = True
    for batch in eval_batches:
        batch["attention_mask"] = block_diagonal_mask(batch["position_ids"])


def build_optimizer(recipe: Recipe, model: torch.nn.Module, accelerator: Accelerator):
    """Return (optimizer, zeroth_order, layerwise)."""
    opt = recipe.optim
    spec = get_spec(opt.name)
    hparams = dict(opt.args, lr=opt.lr)
    if "total_steps" in accepted_hparams(opt.name) and "total_steps" not in hparams:
        hparams["total_steps"] = recipe.train.steps  # ZO-AdaMU's annealing spans the run
    if opt.weight_decay is not None:
        hparams["weight_decay"] = opt.weight_decay
    optimizer = create_optimizer(model, opt.name, target_modules=opt.target_modules, **hparams)
    if spec.zeroth_order and recipe.train.grad_accum != 1:
        raise ValueError("train.grad_accum: zeroth-order optimizers take one batch per step (set it to 1)")
    if opt.layerwise:
        from lowmem.optim.layerwise import LayerwiseOptimizer, check_layerwise

        check_layerwise("optim.layerwise", zeroth_order=spec.zeroth_order)
    if opt.layerwise and not recipe.offload.enabled:  # the offload engine is layer-wise itself
        check_layerwise("optim.layerwise", max_grad_norm=opt.max_grad_norm, processes=accelerator.num_processes,
                        fp16=recipe.train.mixed_precision == "fp16")
        optimizer = LayerwiseOptimizer(optimizer, grad_accum_steps=recipe.train.grad_accum,
                                       max_grad_norm=opt.max_grad_norm, model=model)
    return optimizer, spec.zeroth_order, opt.layerwise and not recipe.offload.enabled


def build_run(recipe: Recipe, accelerator: Accelerator) -> Run:
    tokenizer = load_tokenizer(recipe.model)
    train_batches, eval_batches, counts, loss_fn, eval_fn = build_data(recipe, tokenizer)
    model = load_model(recipe.model)
    keep_documents_apart(model, train_batches, eval_batches)
    generators: dict[str, torch.Generator] = {}
    sampler = apply_activations(model, recipe.activations, recipe.train.seed + accelerator.process_index)
    if sampler is not None:  # WTA-CRS: ranks sample different rows
        generators["wta_crs"] = sampler
    if recipe.train.loss_chunk_tokens is not None:
        lm_body_and_head(model)  # a model it cannot reproduce is refused before training
    optimizer, zeroth_order, _ = build_optimizer(recipe, model, accelerator)
    scheduler = build_scheduler(optimizer, recipe.train)
    stepper = make_step(recipe, model, optimizer, zeroth_order, accelerator, loss_fn, eval_fn)
    return Run(stepper=stepper, tokenizer=tokenizer, scheduler=scheduler, train_batches=train_batches,
               eval_batches=eval_batches, generators=generators, data_counts=counts)
