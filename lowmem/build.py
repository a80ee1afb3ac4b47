"""Build everything a run needs from a recipe: model, tokenizer, data, optimizer, schedule, samplers.

One function per part, composed by :func:`build_run`; the trainer only sees the :class:`Run`. A step
alone (the planner's trace, the measuring tool) is :func:`build_step`, the same composition.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from lowmem.activations import apply_activations
from lowmem.data import CandidateBatches, PackedBatches, label_examples, pack_tokens, split_documents
from lowmem.models import load_model, load_tokenizer, save_pretrained
from lowmem.objectives import CandidateCollator, causal_lm_loss, classification_loss, lm_body_and_head
from lowmem.optim.registry import accepted_hparams, create_optimizer, get_spec
from lowmem.recipe import Recipe, TrainSection
from lowmem.steps import OneProcess, Step, make_step


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
        save_pretrained(model, self.tokenizer, directory)


def lr_factor(i: int, kind: str, warm: int, total: int, floor: float) -> float:
    """The LR at scheduler step ``i`` over the peak: ``i / W`` during warmup, then with
    ``p = (i - W) / (T - W)``: constant 1, linear ``1 - (1 - r) p``, cosine ``r + (1 - r)(1 + cos(pi p)) / 2``
    (``r = min_lr_ratio``), as transformers' ``get_constant_schedule_with_warmup``,
    ``get_polynomial_decay_schedule_with_warmup`` (power 1) and ``get_cosine_with_min_lr_schedule_with_warmup``."""
    if i < warm:
        return i / max(1, warm)
    if kind == "constant" or floor == 1.0:
        return 1.0
    p = min(1.0, (i - warm) / max(1, total - warm))
    if kind == "linear":
        return 1.0 - (1.0 - floor) * p
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.lr_schedule`` (:func:`lr_factor`) as a ``LambdaLR``. Written here rather than taken from
    ``transformers.optimization``: that module imports peft, which imports bitsandbytes, whose import
    prints kernel-hub warnings in every run (issue 24)."""
    factor = functools.partial(lr_factor, kind=train.lr_schedule, warm=train.warmup_steps, total=train.steps,
                               floor=train.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    """Return (train batches, eval batches) for ``data.task``."""
    train_docs, eval_docs = split_documents(recipe.data, recipe.train.seed)
    return DATA_BUILDERS[recipe.data.task](recipe, tokenizer, train_docs, eval_docs)


def build_optimizer(recipe: Recipe, model: torch.nn.Module):
    """Return (optimizer, zeroth_order): ``optim.name`` on ``model``'s parameters, as built; the step
    class prepares it for its way of stepping (layer-wise: :class:`lowmem.steps.LayerwiseStep`)."""
    opt = recipe.optim
    spec = get_spec(opt.name)
    hparams = dict(opt.args, lr=opt.lr)
    if "total_steps" in accepted_hparams(opt.name) and "total_steps" not in hparams:
        hparams["total_steps"] = recipe.train.steps  # ZO-AdaMU's annealing spans the run
    if opt.weight_decay is not None:
        hparams["weight_decay"] = opt.weight_decay
    return create_optimizer(model, opt.name, target_modules=opt.target_modules, **hparams), spec.zeroth_order


def build_step(recipe: Recipe, model: torch.nn.Module, accelerator) -> Step:
    """The step object of ``recipe`` on ``model``: the optimizer as :func:`build_optimizer` makes it and
    the objective of ``data.task``, in the way of stepping :func:`lowmem.steps.make_step` chooses. The one
    composition of a step: the trainer's run, the planner's trace and the measuring tool all take it."""
    optimizer, zeroth_order = build_optimizer(recipe, model)
    return make_step(recipe, model, optimizer, zeroth_order, accelerator, *objective(recipe))


def in_memory(recipe: Recipe) -> Recipe:
    """``recipe`` with ``offload.enabled`` off: the step traced and measured for an offloaded ZO2 recipe is
    MeZO's in memory (ZO2 equals MeZO bit for bit; its streams have no fake-tensor counterpart)."""
    return recipe.model_copy(update={"offload": recipe.offload.model_copy(update={"enabled": False})})


def recipe_step(recipe: Recipe, model: torch.nn.Module, device: str = "cpu") -> tuple[Step, bool]:
    """:func:`build_step` of ``recipe`` in memory (:func:`in_memory`) on one process (:class:`OneProcess`,
    the recipe's autocast), and whether it is zeroth order: the step the planner traces and the
    measuring tool measures."""
    recipe = in_memory(recipe)
    stepper = build_step(recipe, model, OneProcess(recipe.train.mixed_precision, device))
    return stepper, get_spec(recipe.optim.name).zeroth_order


def sample_batch(recipe: Recipe, vocab_size: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A micro-batch of the largest shape ``recipe`` trains on, from a fixed generator (what the planner
    traces and the measuring tool measures): ``data.task: lm`` ``(batch_size, seq_len)`` token ids with
    labels; ``classification``: every example's rows filled to ``seq_len`` by :func:`candidate_collator`
    (the text truncated, the candidates whole)."""
    if recipe.data.task == "classification":
        collator = candidate_collator(recipe, load_tokenizer(recipe.model))
        text = FILLER * recipe.train.seq_len
        examples = [(text, i % len(collator.verbalizers)) for i in range(recipe.train.batch_size)]
        return {k: v.to(device) for k, v in collator(examples).items()}
    gen = torch.Generator().manual_seed(recipe.train.seed)
    ids = torch.randint(0, vocab_size, (recipe.train.batch_size, recipe.train.seq_len), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


FILLER = "lorem "  # the text of a sampled classification example, long enough to be truncated


def no_grad_forward(recipe: Recipe, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """The reference every step peak is compared with: one forward without autograd (with the LM loss;
    a classification batch's inputs only)."""
    drop = ("labels", "option_mask") if "option_mask" in batch else ()
    with torch.no_grad(), OneProcess(recipe.train.mixed_precision, batch["input_ids"].device).autocast():
        model(**{k: v for k, v in batch.items() if k not in drop}, use_cache=False)


def build_run(recipe: Recipe, accelerator: Accelerator) -> Run:
    tokenizer = load_tokenizer(recipe.model)
    train_batches, eval_batches = build_data(recipe, tokenizer)
    model = load_model(recipe.model)
    generators: dict[str, torch.Generator] = {}
    sampler = apply_activations(model, recipe.activations, recipe.train.seed + accelerator.process_index)
    if sampler is not None:  # WTA-CRS: ranks sample different rows
        generators["wta_crs"] = sampler
    if recipe.train.loss_chunk_tokens is not None:
        lm_body_and_head(model)  # a model it cannot reproduce is refused before training
    stepper = build_step(recipe, model, accelerator)
    scheduler = build_scheduler(stepper.inner_optimizer, recipe.train)
    return Run(stepper=stepper, tokenizer=tokenizer, scheduler=scheduler, train_batches=train_batches,
               eval_batches=eval_batches, generators=generators)
