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
from lowmem.data import CandidateBatches, PackedBatches, label_examples, pack_tokens, split_documents
from lowmem.int8_weights import Int8Updates
from lowmem.models import load_model, load_tokenizer
from lowmem.objectives import CandidateCollator, causal_lm_loss, classification_loss, lm_body_and_head
from lowmem.optim.registry import accepted_hparams, create_optimizer, get_spec
from lowmem.recipe import Recipe, TrainSection
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

    @property
    def model(self) -> torch.nn.Module:
        return self.stepper.model

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """What a checkpoint saves and the scheduler drives."""
        return self.stepper.inner_optimizer

    def save_model(self, model: torch.nn.Module, directory: Path) -> None:
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


def _lm_data(recipe: Recipe, tokenizer, train_docs, eval_docs):
    tr = recipe.train
    train_rows = pack_tokens(train_docs, tokenizer, tr.seq_len, "data.path")
    eval_rows = pack_tokens(eval_docs, tokenizer, tr.seq_len, recipe.data.eval_path or "data.path (eval split)")
    evals = [{"input_ids": b, "labels": b.clone()} for b in eval_rows[: tr.eval_batches * tr.batch_size].split(tr.batch_size)]
    return PackedBatches(train_rows, tr.batch_size, tr.seed), evals


def _classification_data(recipe: Recipe, tokenizer, train_docs, eval_docs):
    tr = recipe.train
    labels = list(recipe.data.classification.candidates)
    collator = candidate_collator(recipe, tokenizer)
    train = label_examples(train_docs, labels, recipe.data.path)
    held = label_examples(eval_docs, labels, recipe.data.eval_path or recipe.data.path)
    held = held[: tr.eval_batches * tr.batch_size]
    evals = [collator(held[i:i + tr.batch_size]) for i in range(0, len(held), tr.batch_size)]
    return CandidateBatches(train, collator, tr.batch_size, tr.seed), evals


DATA_BUILDERS = {"lm": _lm_data, "classification": _classification_data}


def build_data(recipe: Recipe, tokenizer):
    """Return (train batches, eval batches, loss_fn, eval_fn) for ``data.task``."""
    train_docs, eval_docs = split_documents(recipe.data, recipe.train.seed)
    return (*DATA_BUILDERS[recipe.data.task](recipe, tokenizer, train_docs, eval_docs), *objective(recipe))


def build_optimizer(recipe: Recipe, model: torch.nn.Module, accelerator: Accelerator):
    """Return (optimizer, zeroth_order, layerwise). With ``model.dtype: int8`` the optimizer doing the math
    carries ``int8_updates`` (:class:`~lowmem.int8_weights.Int8Updates`: its rounding generator is checkpointed)."""
    opt = recipe.optim
    spec = get_spec(opt.name)
    hparams = dict(opt.args, lr=opt.lr)
    if "total_steps" in accepted_hparams(opt.name) and "total_steps" not in hparams:
        hparams["total_steps"] = recipe.train.steps  # ZO-AdaMU's annealing spans the run
    if opt.weight_decay is not None:
        hparams["weight_decay"] = opt.weight_decay
    optimizer = create_optimizer(model, opt.name, target_modules=opt.target_modules, **hparams)
    if recipe.model.dtype == "int8":  # hooks on the optimizer that does the math, inside any layer-wise wrapper
        optimizer.int8_updates = Int8Updates(model, optimizer, recipe.train.seed)
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
    train_batches, eval_batches, loss_fn, eval_fn = build_data(recipe, tokenizer)
    model = load_model(recipe.model)
    generators: dict[str, torch.Generator] = {}
    sampler = apply_activations(model, recipe.activations, recipe.train.seed + accelerator.process_index)
    if sampler is not None:  # WTA-CRS: ranks sample different rows
        generators["wta_crs"] = sampler
    if recipe.train.loss_chunk_tokens is not None:
        lm_body_and_head(model)  # a model it cannot reproduce is refused before training
    optimizer, zeroth_order, _ = build_optimizer(recipe, model, accelerator)
    if recipe.model.dtype == "int8":  # the same seed on every process: replicas round alike
        generators["int8_rounding"] = getattr(optimizer, "optimizer", optimizer).int8_updates.generator
    scheduler = build_scheduler(optimizer, recipe.train)
    stepper = make_step(recipe, model, optimizer, zeroth_order, accelerator, loss_fn, eval_fn)
    return Run(stepper=stepper, tokenizer=tokenizer, scheduler=scheduler, train_batches=train_batches,
               eval_batches=eval_batches, generators=generators)
