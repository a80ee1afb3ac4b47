"""The training loop: recipe -> model, data, optimizer -> steps -> metrics, checkpoints, model.

Short and linear (nanoGPT's train.py is the model). How one step runs (first order, layer-wise,
zeroth order, ZO2, first-order offload) is the run's step object (:mod:`lowmem.steps`, chosen once
by :func:`lowmem.build.build_run`); the loop only feeds it micro-batches and reads the loss back.

A non-finite loss or gradient skips the step: it is logged and counted as a bad step, not as an
optimizer step, and the LR schedule does not advance (what a skipped step leaves untouched:
:mod:`lowmem.steps.base`; the layer-wise and first-order offload steps have updated the parameters
with finite gradients already).
``train.max_bad_steps`` in a row stop the run with a checkpoint of the last good state.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from lowmem import checkpoint as ckpt
from lowmem.build import build_run
from lowmem.integrations.deepspeed import refuse_deepspeed_launch
from lowmem.memory import PhasePeaks, cuda_peak_bytes, state_bytes
from lowmem.recipe import Recipe
from lowmem.run_dir import check_run_dir, clear_run
from lowmem.steps import eval_mode, unwrap


class TrainingStopped(RuntimeError):
    """The run stopped itself (e.g. too many non-finite steps); the message is one line."""


def note(message: str) -> None:
    """One line on stderr for the user (the CLI's prefix), kept clear of the progress bar."""
    tqdm.write(f"lowmem-train: {message}", file=sys.stderr)


class Trainer:
    """``resume``: continue from the newest checkpoint in ``output.dir``; ``overwrite``: replace the run
    there. Neither, and ``output.dir`` already holds a run: refused (:mod:`lowmem.run_dir`)."""

    def __init__(self, recipe: Recipe, resume: bool = False, progress: bool = True,
                 predicted_peak_bytes: int | None = None, predict=None, overwrite: bool = False):
        self.recipe, self.resume, self.progress = recipe, resume, progress
        self.predicted_peak_bytes = predicted_peak_bytes  # lowmem.planner's prediction, shown in the summary
        self.predict = predict  # or: the model's config -> predicted peak bytes, asked once the run is measured
        self.out = Path(recipe.output.dir)
        check_run_dir(self.out, resume=resume, overwrite=overwrite, steps=recipe.train.steps,
                      save_model=recipe.output.save_model)  # before any work
        AcceleratorState._reset_state()  # a second run in one process may use another precision
        self.accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision,
                                       cpu=not torch.cuda.is_available())
        refuse_deepspeed_launch(self.accelerator)  # the loop is not a DeepSpeed engine loop (README)
        if overwrite and self.accelerator.is_main_process:
            removed = clear_run(self.out)
            if removed:
                note(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.out}")
        self.accelerator.wait_for_everyone()
        set_seed(recipe.train.seed)
        self.peaks = PhasePeaks()  # measured peak RSS of each phase (lowmem.planner.phases predicts them)
        with self.peaks.phase("build"):
            self.run = build_run(recipe, self.accelerator)
        self.step = 0          # optimizer steps taken
        self.attempt = 0       # step attempts (taken or skipped): the data position
        self.bad_in_row = 0
        self.bad_total = 0

    # ---------------------------------------------------------------- data
    def micro_batch(self, micro: int) -> dict[str, torch.Tensor]:
        acc, tr = self.accelerator, self.recipe.train
        position = (self.attempt * tr.grad_accum + micro) * acc.num_processes + acc.process_index
        return {k: v.to(acc.device) for k, v in self.run.train_batches.batch(position).items()}

    # ---------------------------------------------------------------- steps
    def train_step(self) -> dict:
        """One step attempt of the run's step object (lowmem.steps); a NaN loss means it was skipped."""
        t0 = time.perf_counter()
        with self.peaks.phase("step"):
            loss, norm = self.run.stepper.step(self.micro_batch)
        self.attempt += 1
        record = {"step": self.step + 1, "loss": loss, "lr": self.run.inner_optimizer.param_groups[0]["lr"]}
        if math.isnan(loss):
            self.bad_in_row += 1
            self.bad_total += 1
            return {**record, "step": self.step, "skipped": True, "bad_steps": self.bad_total}
        self.bad_in_row = 0
        self.step += 1
        self.run.scheduler.step()
        tokens = self.run.train_batches.tokens_per_batch() * self.recipe.train.grad_accum
        record["tokens_per_s"] = tokens * self.accelerator.num_processes / (time.perf_counter() - t0)
        if norm is not None:
            record["grad_norm"] = norm
        return record

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float]:
        """:meth:`evaluate_all`, its peak RSS measured as the eval phase."""
        with self.peaks.phase("eval"):
            return self.evaluate_all()

    @torch.no_grad()
    def evaluate_all(self) -> dict[str, float]:
        """Mean of each eval metric over the eval batches, split across processes: rank r takes batches
        r, r + N, ... Every rank runs the same number of forwards (DDP's forward broadcasts buffers, a
        collective): a rank past the last batch repeats batch 0 with weight 0. The mean is one process's."""
        run, acc = self.run, self.accelerator
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=acc.device)
        run.stepper.flush()  # deferred work (ZO2's pending update) applied before the weights are read
        n, ranks = len(run.eval_batches), acc.num_processes
        with eval_mode(run.model):
            for i in range(acc.process_index, -(-n // ranks) * ranks, ranks):
                weight = 1.0 if i < n else 0.0
                batch = {k: v.to(acc.device) for k, v in run.eval_batches[i if i < n else 0].items()}
                for name, value in run.stepper.evaluate(batch).items():
                    sums[name] = sums.get(name, 0.0) + weight * value.detach().float()
                count += weight
        total = acc.reduce(torch.stack([*sums.values(), count]), "sum")
        return {name: (total[i] / total[-1]).item() for i, name in enumerate(sums)}

    # ---------------------------------------------------------------- io
    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self) -> None:
        stepper = self.run.stepper
        where = stepper.save_kwargs()  # the weights (model or engine's) and the step's extra
        where["extra"].update(attempt=self.attempt, bad_total=self.bad_total)
        generator_states = self._generator_states()  # a collective: before the rank-0-only write
        if self.accelerator.is_main_process:
            with stepper.saving(), self.peaks.phase("save"):
                ckpt.save_checkpoint(self.out, self.step, optimizer=stepper.inner_optimizer,
                                     scheduler=self.run.scheduler,
                                     generator_states=generator_states,
                                     keep_last=self.recipe.train.keep_checkpoints, **where)
        self.accelerator.wait_for_everyone()

    def _generator_states(self) -> dict[str, list[torch.Tensor]]:
        """Every rank's state of each private generator, in rank order: they differ per rank (WTA-CRS
        seeds its sampler with ``seed + rank``), so rank 0's alone would not resume the others."""
        acc, states = self.accelerator, {}
        for name, generator in self.run.generators.items():
            state = generator.get_state()
            if acc.num_processes > 1:  # same length on every rank: one generator type per name
                states[name] = list(acc.gather(state[None].to(acc.device)).cpu().unbind(0))
            else:
                states[name] = [state]
        return states

    def evaluate_shown(self, bar) -> dict[str, float]:
        """:meth:`evaluate`, with the bar saying so (the step-0 evaluation comes before any step)."""
        bar.set_description("eval")
        metrics = self.evaluate()
        bar.set_description("train")
        return metrics

    def restore(self) -> int:
        """Load the newest checkpoint; returns how many metrics.jsonl records past it were dropped (the
        steps after the checkpoint run again and log anew)."""
        stepper = self.run.stepper
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint in {self.out / 'checkpoints'}")
        with stepper.loading():
            extra = ckpt.load_checkpoint(path, optimizer=stepper.inner_optimizer, scheduler=self.run.scheduler,
                                         generators=self.run.generators, rank=self.accelerator.process_index,
                                         world_size=self.accelerator.num_processes, **stepper.load_kwargs())
        stepper.restore(extra)
        self.step, self.attempt, self.bad_total = extra["step"], extra["attempt"], extra["bad_total"]
        metrics = self.out / "metrics.jsonl"
        if not (self.accelerator.is_main_process and metrics.exists()):
            return 0
        records = metrics.read_text().splitlines()
        kept = [r for r in records if json.loads(r)["step"] <= self.step]
        if len(kept) < len(records):  # atomically: a kill here keeps the old file
            tmp = metrics.with_name(metrics.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            tmp.replace(metrics)
        return len(records) - len(kept)

    # ---------------------------------------------------------------- loop
    def train(self) -> dict:
        tr = self.recipe.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            dropped = self.restore()
            if self.accelerator.is_main_process:
                again = f"; {dropped} metrics.jsonl records past it dropped (those steps run again)" if dropped else ""
                note(f"resumed {self.out} from its checkpoint of step {self.step} (train.steps={tr.steps}){again}")
        bar = tqdm(total=tr.steps, initial=self.step, disable=not (self.progress and self.accelerator.is_main_process),
                   desc="train", dynamic_ncols=True)
        if not self.resume:
            self.log({"step": 0, **self.evaluate_shown(bar)})
        t_start = time.perf_counter()
        while self.step < tr.steps:
            record = self.train_step()
            if record.get("skipped"):
                self.log(record)
                if self.bad_in_row >= tr.max_bad_steps:
                    self.save()
                    raise TrainingStopped(f"train.max_bad_steps: {self.bad_in_row} non-finite steps in a row "
                                          f"after step {self.step}; last good state saved in {self.out}/checkpoints")
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=rate(record["tokens_per_s"]))
            if self.step % tr.log_every == 0 or self.step == tr.steps:
                self.log(record)
            if tr.eval_every and self.step % tr.eval_every == 0 and self.step < tr.steps:
                self.log({"step": self.step, **self.evaluate_shown(bar)})
            if tr.checkpoint_every and self.step % tr.checkpoint_every == 0:
                self.save()
        bar.close()
        return self.finish(time.perf_counter() - t_start)

    def finish(self, wall_s: float) -> dict:
        final = self.evaluate()
        self.log({"step": self.step, **final})
        records = [json.loads(r) for r in (self.out / "metrics.jsonl").read_text().splitlines()] \
            if self.accelerator.is_main_process else []
        first = next((r for r in records if "eval_loss" in r), {})
        summary = {
            "steps": self.step, "skipped_steps": self.bad_total, "wall_time_s": round(wall_s, 2),
            **{f"{k}_before": v for k, v in first.items() if k.startswith("eval_")}, **final,
            "eval_perplexity": math.exp(min(final["eval_loss"], 50.0)),
            "peak_rss_gb": self.peaks.run_peak_gb(),
            "peak_cuda_gb": None if cuda_peak_bytes() is None else round(cuda_peak_bytes() / 2**30, 3),
            "predicted_peak_gb": None if self.predicted_peak_bytes is None
            else round(self.predicted_peak_bytes / 2**30, 3),
            "optimizer_state_mb": round(state_bytes(self.run.inner_optimizer) / 2**20, 3),
            "optimizer": self.recipe.optim.name,
            "peak_rss_by_phase_gb": self.peaks.gb(),  # save: added once the model is saved
            "data": self.run.data_counts,
            **self.run.stepper.summary(),  # the step's own figures (FSDP2: per-rank bytes)
        }
        if summary["predicted_peak_gb"] is None and self.predict is not None and self.accelerator.is_main_process:
            predicted = self.predict(unwrap(self.run.model).config)  # after the measurement
            summary["predicted_peak_gb"] = None if predicted is None else round(predicted / 2**30, 3)
        self.write_summary(summary)  # first: a kill during the save still leaves the summary
        with self.peaks.phase("save"):
            self.save_model()
        summary.update(peak_rss_by_phase_gb=self.peaks.gb(), peak_rss_gb=self.peaks.run_peak_gb())
        if self.accelerator.num_processes > 1:  # every rank's (a collective), rank 0's first: what a host holds
            summary["peak_rss_by_phase_gb_per_rank"] = gather_object([self.peaks.gb()])
        self.write_summary(summary)
        self.accelerator.wait_for_everyone()
        return summary

    def write_summary(self, summary: dict) -> None:
        if self.accelerator.is_main_process:  # atomically: a kill leaves the previous one
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            tmp.replace(self.out / "summary.json")

    def save_model(self) -> None:
        """``output.dir/model``: in memory after closing the step, or streamed block by block from the
        offload tiers (the blocks never all come back into RAM), then the step is released."""
        stepper = self.run.stepper
        if not (self.recipe.output.save_model and self.accelerator.is_main_process):
            stepper.release()
            return
        parts = stepper.model_parts()
        if parts is None:
            stepper.close()  # the last deferred update flushed, offloaded blocks back into the model
            self.run.save_model(unwrap(self.run.model), self.out / "model")
            return
        self.run.save_model(unwrap(self.run.model), self.out / "model", parts)
        stepper.release()


def rate(tokens_per_s: float) -> str:
    """Tokens/s for the bar: whole numbers from 100 up, three significant digits below (0.42, not 0)."""
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def train(recipe: Recipe, resume: bool = False, progress: bool = True,
          predicted_peak_bytes: int | None = None, predict=None, overwrite: bool = False) -> dict:
    """Run ``recipe`` to the end and return the summary (also written to ``output.dir/summary.json``);
    ``predict(model_config) -> bytes | None`` fills the summary's prediction when none was given;
    ``resume`` / ``overwrite``: see :class:`Trainer`."""
    return Trainer(recipe, resume=resume, progress=progress, predicted_peak_bytes=predicted_peak_bytes,
                   predict=predict, overwrite=overwrite).train()
