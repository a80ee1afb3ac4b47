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
import torch.distributed as dist
from accelerate import Accelerator

from lowmem.activations import apply_activations
from lowmem.data import (CandidateBatches, PackedBatches, PaddedBatches, block_diagonal_mask, held_out_batches,
                         label_examples, lm_examples, lm_rows, pack_examples, pack_tokens, split_documents)
from lowmem.int8_weights import Int8Updates
from lowmem.model_save import save_atomically, save_streamed
from lowmem.models import load_model, load_tokenizer, save_pretrained
from lowmem.objectives import CandidateCollator, causal_lm_loss, classification_loss, lm_body_and_head
from lowmem.optim.registry import accepted_hparams, create_optimizer, get_spec
from lowmem.recipe import Recipe, TrainSection
from lowmem.sft import sft_examples
from lowmem.steps import OneProcess, Step, make_step
from lowmem.steps.fsdp import loads_on_rank0
from lowmem.structure import block_container


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

    def save_model(self, model: torch.nn.Module, directory: Path, parts=None) -> None:
        """``save_pretrained``'s files into ``directory``, atomically; from ``parts`` (the blocks in the
        offload tiers, streamed, :func:`lowmem.model_save.save_streamed`) when given."""
        model.config.use_cache = True  # off for training (lowmem.models.load_model); generation wants it
        if parts is None:
            save_atomically(directory, lambda tmp: save_pretrained(model, self.tokenizer, tmp))
        else:
            save_atomically(directory, lambda tmp: save_streamed(model, self.tokenizer, tmp, parts))


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
    """Return (train batches, eval batches, counts) for ``data.task``."""
    return DATA_BUILDERS[recipe.data.task](recipe, tokenizer)


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


def keep_documents_apart(model, train_batches, eval_batches: list[dict], decided_by_rank0: bool = False) -> None:
    """Give packed batches an explicit block-diagonal mask where ``model``'s own would ignore positions;
    ``decided_by_rank0``: rank 0 alone has the weights to run the probe, and tells the others."""
    if not isinstance(train_batches, PackedBatches):
        return
    ignores = [mask_ignores_positions(model) if not decided_by_rank0 or dist.get_rank() == 0 else None]
    if decided_by_rank0:
        dist.broadcast_object_list(ignores, src=0)
    if not ignores[0]:
        return
    train_batches.block_mask = True
    for batch in eval_batches:
        batch["attention_mask"] = block_diagonal_mask(batch["position_ids"])


def build_optimizer(recipe: Recipe, model: torch.nn.Module):
    """Return (optimizer, zeroth_order): ``optim.name`` on ``model``'s parameters, as built; the step
    class prepares it for its way of stepping (layer-wise: :class:`lowmem.steps.LayerwiseStep`). With
    ``model.dtype: int8`` it carries ``int8_updates`` (:class:`~lowmem.int8_weights.Int8Updates`: its
    rounding generator is checkpointed)."""
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
    return optimizer, spec.zeroth_order


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
    traces and the measuring tool measures): ``data.task: lm`` or ``sft`` ``(batch_size, seq_len)`` token ids
    with labels (packed: position_ids of two documents a row); ``classification``: every example's rows filled to ``seq_len`` by :func:`candidate_collator`
    (the text truncated, the candidates whole)."""
    if recipe.data.task == "classification":
        collator = candidate_collator(recipe, load_tokenizer(recipe.model))
        text = FILLER * recipe.train.seq_len
        examples = [(text, i % len(collator.verbalizers)) for i in range(recipe.train.batch_size)]
        return {k: v.to(device) for k, v in collator(examples).items()}
    gen = torch.Generator().manual_seed(recipe.train.seed)
    shape = (recipe.train.batch_size, recipe.train.seq_len)
    ids = torch.randint(0, vocab_size, shape, generator=gen)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
    if recipe.data.packing:  # two documents per row: the model builds its block-diagonal mask, as in training
        batch["position_ids"] = (torch.arange(shape[1]) % (shape[1] // 2 + 1)).expand(shape).to(device)
    return batch


FILLER = "lorem "  # the text of a sampled classification example, long enough to be truncated


def no_grad_forward(recipe: Recipe, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """The reference every step peak is compared with: one forward without autograd (with the LM loss;
    a classification batch's inputs only)."""
    drop = ("labels", "option_mask") if "option_mask" in batch else ()
    with torch.no_grad(), OneProcess(recipe.train.mixed_precision, batch["input_ids"].device).autocast():
        model(**{k: v for k, v in batch.items() if k not in drop}, use_cache=False)


def build_run(recipe: Recipe, accelerator: Accelerator) -> Run:
    tokenizer = load_tokenizer(recipe.model)
    train_batches, eval_batches, counts = build_data(recipe, tokenizer)
    from_rank0 = loads_on_rank0(recipe, accelerator.num_processes)  # FSDP2: the other ranks' weights come from rank 0's
    model = load_model(recipe.model, streamed=recipe.offload.enabled,  # offloaded: blocks built into their tiers
                       on_meta=from_rank0 and not accelerator.is_main_process)
    keep_documents_apart(model, train_batches, eval_batches, decided_by_rank0=from_rank0)
    generators: dict[str, torch.Generator] = {}
    sampler = apply_activations(model, recipe.activations, recipe.train.seed + accelerator.process_index)
    if sampler is not None:  # WTA-CRS: ranks sample different rows
        generators["wta_crs"] = sampler
    if recipe.train.loss_chunk_tokens is not None:
        lm_body_and_head(model)  # a model it cannot reproduce is refused before training
    stepper = build_step(recipe, model, accelerator)
    if recipe.model.dtype == "int8":  # the same seed on every process: replicas round alike
        inner = stepper.inner_optimizer
        generators["int8_rounding"] = getattr(inner, "optimizer", inner).int8_updates.generator
    scheduler = build_scheduler(stepper.inner_optimizer, recipe.train)
    return Run(stepper=stepper, tokenizer=tokenizer, scheduler=scheduler, train_batches=train_batches,
               eval_batches=eval_batches, generators=generators, data_counts=counts)
