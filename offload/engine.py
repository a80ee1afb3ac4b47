"""ZO2: zeroth-order fine-tuning with the decoder blocks offloaded (Wang et al., 2025,
"Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models with Limited
GPU Memory", arXiv 2503.12668; reference liangyuwang/zo2).

The blocks' parameters live off the device -- host RAM, or NVMe files beyond a
host budget (:mod:`lowmem.offload.streamed`, :mod:`lowmem.offload.store`); embeddings,
final norm and ``lm_head`` stay on it. This module is ZO2's schedule alone (§3.2-3.3):
one step of MeZO (Malladi et al., 2023, arXiv 2305.17333, Alg. 1) with step seed ``s``::

    dual forward of [x; x] (hooks.py): for each unit in forward order
        block i: upload (prefetched) -> apply the deferred update of step t-1
                 -> +eps z, branch + -> -2 eps z, branch - -> +eps z -> offload
    g = (L+ - L-) / (2 eps)                  # float64, as lowmem.optim.mezo
    resident params: theta -= lr (g z + wd theta) now; blocks: pending until next visit

so each block crosses PCIe once per direction per step. Only the optimizer's
parameters are perturbed and updated (``model.trainable``: a frozen weight keeps
its stored value, and a block with no trained weight is never written back). Every parameter goes
through exactly MeZO's in-place sequence with the same per-parameter seeds
(:mod:`lowmem.optim.zo_noise`): in fp32 the engine equals in-memory
:class:`lowmem.optim.mezo.MeZO` bit for bit. Applying a pending update early
(``flush``) does not change any number, so flushing is always safe.

Contract with the trainer::

    opt = create_optimizer(model, "mezo", lr=..., eps=..., seed=...)   # n_samples=1, momentum=0
    engine = ZO2Engine(model, opt, recipe.offload)   # the recipe's OffloadSection; model on CPU
    loss = engine.step(batch)        # batch: dict of tensors with "labels"; returns L+ (tensor)
    # any other objective (e.g. candidate classification): ZO2Engine(..., loss_fn=fn), fn(model, batch)
    # -> scalar loss computed from the model's outputs (lowmem.offload.objective)
    scheduler.step()                 # the LR of a step is read when the step runs
    engine.eval_loss(batch)          # flushes, then a plain streamed forward (model(**batch) works too)
    engine.evaluate(metrics_fn, batch)   # flushes, then metrics_fn(model, batch) on the streamed model
    ckpt = {"weights": engine.model_state_dict(), "engine": engine.state_dict()}   # consistent pair
    # (offload.host_dtype: int8 -- state_dict() also holds the stored int8 blocks, exact on resume)
    engine.load_model_state_dict(ckpt["weights"]); engine.load_state_dict(ckpt["engine"])
    engine.close()                   # flush, put the blocks back into the model (CPU), remove hooks

``state_dict()`` holds the optimizer's state (its seed generator) and the pending
update (seed, g, per-group lr and wd): plain numbers and tensors only.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from lowmem.offload.base import StreamedEngine
from lowmem.offload.hooks import ModelDriver
from lowmem.offload.objective import DualCall
from lowmem.offload.resident import Indexed, ResidentPerturber, perturbed_pair
from lowmem.offload.settings import OffloadSection
from lowmem.optim.zo_noise import mix_seed, param_seed, sgd_update_
from lowmem.safetensors_stream import Part

_ROUND_STREAM = 1 << 40  # seeds of the stochastic rounding, apart from the perturbation streams


def _check_optimizer(optimizer) -> None:
    if not getattr(optimizer, "zeroth_order", False) or not hasattr(optimizer, "indexed_params"):
        raise ValueError("optim.name: the ZO2 engine needs the 'mezo' optimizer")
    if getattr(optimizer, "n_samples", 1) != 1 or any(g.get("momentum", 0) for g in optimizer.param_groups):
        raise ValueError("optim.args: ZO2 supports MeZO with n_samples=1 and momentum=0")
    if optimizer.exchange.rank_world()[1] != 1:
        raise ValueError("offload.enabled: ZO2 runs on one process; distributed ZO needs offload off")


class ZO2Engine(StreamedEngine):
    """MeZO steps on ``model`` with its blocks offloaded; see the module docstring for the contract."""

    def __init__(self, model: nn.Module, optimizer, config: OffloadSection | dict | None = None,
                 device: torch.device | str | None = None, loss_fn: Callable | None = None):
        _check_optimizer(optimizer)
        super().__init__(model, optimizer, config, device)
        self.loss_fn = loss_fn
        group_no = {id(g): n for n, g in enumerate(optimizer.param_groups)}
        self.index = {id(p): (idx, group_no[id(group)]) for idx, p, group in optimizer.indexed_params()}
        if set(self.index) - {id(p) for p in model.parameters()}:
            raise ValueError("model: the optimizer holds a parameter outside the model's blocks and modules")
        host = self.compute_dtype if self.config.host_dtype is None else getattr(torch, self.config.host_dtype)
        trained = [[id(p) in self.index for p in block.parameters()] for block in self.blocks]
        self._stream(host, self.compute_dtype, write_back=True, trained=trained)
        self.driver = ModelDriver(model, self)
        self.block_params: list[Indexed] = [self._indexed(pk.params) for pk in self.packed]
        self.resident = ResidentPerturber([self._indexed(list(m.parameters())) for _, m in self.units],
                                          optimizer.noise)
        self.resident_params = list({id(p): (p, i) for ps in self.resident.unit_params for p, i in ps}.values())
        self.pending: dict | None = None  # every block holds the updates of all steps but this one
        self._seed: int | None = None  # step seed of the dual forward in progress

    # ---- set-up --------------------------------------------------------------------
    def _indexed(self, params: list[nn.Parameter]) -> Indexed:
        return [(p, self.index[id(p)][0]) for p in params if id(p) in self.index]

    # ---- the visitor called by the hooks -------------------------------------------
    def visit(self, key: tuple[str, int], runs: list) -> list:
        kind, k = key
        if kind == "unit":
            if len(runs) == 1:
                return [runs[0]()]
            return self.resident.visit(k, runs, self._seed, self.optimizer.eps)
        if not self.mover.in_pass():  # a plain model(**batch) call outside step(): stream the blocks too
            self.mover.begin(list(range(len(self.packed))))
        self.mover.acquire(k)
        changed = self._apply_pending(k)
        if len(runs) == 2:
            outs = perturbed_pair(self.block_params[k], runs, self._seed, self.optimizer.eps, self.optimizer.noise)
            changed = changed or bool(self.block_params[k])  # a block of frozen weights stays as stored
        else:
            outs = [runs[0]()]
        seed = self._seed if self._seed is not None else (self.pending or {}).get("seed", 0)
        self.mover.release(k, write_back=changed, version=self.steps,
                           round_seed=mix_seed(seed, _ROUND_STREAM + (len(runs) == 1), k))
        return outs

    def _apply_pending(self, k: int) -> bool:
        """MeZO's update of the previous step on block ``k`` (ZO2's deferred update)."""
        if self.pending is None or k in self.pending["done"]:
            return False
        pend = self.pending
        for p, idx in self.block_params[k]:
            gi = self.index[id(p)][1]
            sgd_update_(p, param_seed(pend["seed"], 0, idx), pend["lr"][gi], pend["grad"], pend["weight_decay"][gi],
                        noise=self.optimizer.noise)
        pend["done"].add(k)
        return True

    # ---- training ------------------------------------------------------------------
    @contextlib.contextmanager
    def _forward(self, half_batch: int | None):
        """Eval mode, no autograd, autocast off (as MeZO's fp32_forward), unit splitting on/off."""
        was_training = self.model.training
        self.model.eval()
        self.driver.half_batch = half_batch
        autocast = (torch.autocast(self.device.type, enabled=False) if self.optimizer.fp32_forward
                    else contextlib.nullcontext())
        try:
            with torch.no_grad(), autocast:
                yield
        except BaseException:
            self.mover.abort()
            raise
        finally:
            self.driver.half_batch = None
            self.model.train(was_training)

    def _evaluating(self):
        return self._forward(half_batch=None)

    def _inputs(self, batch: dict) -> dict:
        """The batch without labels, doubled ``[x; x]`` for the dual forward."""
        inputs = self._on_device({k: v for k, v in batch.items() if k != "labels"})
        return {k: torch.cat([v, v]) for k, v in inputs.items()}

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss_function(logits=logits, labels=labels, vocab_size=self.model.config.vocab_size)

    def step(self, batch: dict) -> torch.Tensor:
        """One MeZO step (MeZO Alg. 1) through the offloaded blocks; returns L+ like ``MeZO.step``."""
        eps = self.optimizer.eps
        # 1. step seed from the optimizer's private generator
        self._seed = seed = self.optimizer.draw_step_seed()
        # 2. both perturbed forwards in one pass; blocks take the deferred update of step t-1 on the way
        try:
            loss_plus, loss_minus = self._dual_losses(batch)
        finally:
            self.resident.end_forward(seed, eps)
            self._seed = None
        g = (float(loss_plus) - float(loss_minus)) / (2.0 * eps)  # in float64, as MeZO ...
        g = self.optimizer.exchange([g])[0]  # ... then as MeZO applies it (fp32 on the wire, or one byte)
        # 3. update: resident parameters now, blocks at their next visit (ZO2's deferred update);
        #    a NaN/Inf g updates nothing (the optimizer records the skip for the trainer)
        self.optimizer.finish_step([g])
        if self.optimizer.last_step_skipped:
            return loss_plus.detach()
        groups = self.optimizer.param_groups
        for p, idx in self.resident_params:
            group = groups[self.index[id(p)][1]]
            sgd_update_(p, param_seed(seed, 0, idx), group["lr"], g, group["weight_decay"], noise=self.optimizer.noise)
        self.pending = {"seed": seed, "grad": g, "lr": [gr["lr"] for gr in groups],
                        "weight_decay": [gr["weight_decay"] for gr in groups], "done": set()}
        self.steps += 1
        return loss_plus.detach()

    def _dual_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L+, L-)`` from one dual forward: the model's LM loss, or ``loss_fn`` through :class:`DualCall`."""
        if self.loss_fn is not None:
            batch, rows = self._on_device(batch), batch["input_ids"].shape[0]
            with self._forward(half_batch=rows):
                dual = DualCall(self.model, rows)
                return self.loss_fn(dual.branch(0), batch), self.loss_fn(dual.branch(1), batch)
        labels = batch["labels"].to(self.device)
        b = labels.shape[0]
        with self._forward(half_batch=b):
            logits = self.model(**self._inputs(batch), use_cache=False).logits
        return self._loss(logits[:b], labels), self._loss(logits[b:], labels)

    def flush(self) -> None:
        """Apply the pending update to every block now (numerically the same as deferring it)."""
        if self.pending is None:
            return
        todo = [k for k in range(len(self.packed)) if k not in self.pending["done"]]
        with self._forward(half_batch=None):
            self.mover.begin(todo)
            for k in todo:
                self.visit(("block", k), [lambda: None])
        self.pending = None

    # ---- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Steps, the pending update and the optimizer's state (seed generator): numbers and tensors;
        with an int8 host copy also ``host_blocks`` (see :meth:`host_blocks`)."""
        pending = None
        if self.pending is not None:
            pending = {k: v for k, v in self.pending.items() if k != "done"}
        state = {**super().state_dict(), "pending": pending}
        blocks = self.host_blocks()
        if blocks:
            state["host_blocks"] = blocks
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the block weights must be the ones saved with it (a pending
        update is not applied to them: :meth:`model_state_dict` pairs with it; ``flush()`` first for
        a final model). ``host_blocks``, when present, replace the stored blocks."""
        super().load_state_dict(state)
        pending = state["pending"]
        self.pending = None if pending is None else {**pending, "seed": int(pending["seed"]),
                                                     "grad": float(pending["grad"]), "done": set()}
        self.load_host_blocks(state.get("host_blocks") or [])

    def host_blocks(self) -> list[torch.Tensor]:
        """The blocks' host copies as stored, when the model's weights cannot restore them exactly (an int8
        copy: payload and scales; requantizing dequantized weights may move one by a step); else none."""
        if not self.streamed.format.lossy_roundtrip:
            return []
        return [self.store.get(i) for i in range(len(self.packed))]

    def host_block_parts(self, prefix: str) -> list[Part]:
        """:meth:`host_blocks` as checkpoint parts named ``<prefix><i>``, each read from the store when written."""
        if not self.streamed.format.lossy_roundtrip:
            return []
        return [Part([(f"{prefix}{i}", (n,), self.store.dtype)], lambda i=i: {f"{prefix}{i}": self.store.get(i)})
                for i, n in enumerate(self.store.numels)]

    def load_host_blocks(self, blocks: list[torch.Tensor]) -> None:
        """Put back what :meth:`host_blocks` gave (after :meth:`load_model_state_dict`, which they override)."""
        if blocks and len(blocks) != len(self.packed):
            raise ValueError(f"checkpoint: {len(blocks)} host blocks for a model of {len(self.packed)} blocks")
        for i, t in enumerate(blocks):
            self.load_host_block(i, t)

    def load_host_block(self, i: int, t: torch.Tensor) -> None:
        """Block ``i``'s stored copy, as :meth:`host_blocks` gave it."""
        if t.dtype != self.store.dtype or t.numel() != self.store.numels[i]:
            raise ValueError(f"checkpoint: host block {i} is {t.numel()} {t.dtype}, the engine's "
                             f"{self.store.numels[i]} {self.store.dtype} (another offload.host_dtype?)")
        self.store.put(i, t.reshape(-1), version=self.steps)
