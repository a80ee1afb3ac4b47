"""The training loop: exact resume in a new process, non-finite steps, the saved model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem.model_save import saved_tensors
from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer, TrainingStopped

CRASH_AFTER = """
import os, sys
from lowmem.recipe import load_recipe
from lowmem.trainer import Trainer

class Crash(Trainer):  # a process that dies (no cleanup) in the middle of step 5
    def train_step(self):
        if self.step == 4:
            os._exit(17)
        return super().train_step()

Crash(load_recipe(sys.argv[1], sys.argv[2:]), progress=False).train()
"""


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "lowmem.cli", *args, "--quiet"], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


RESUME_THEN_WHOLE = """
import sys
from lowmem.cli import main

recipe, broken, whole = sys.argv[1:]
for args in ([f"output.dir={broken}", "--resume"], [f"output.dir={whole}"]):
    if main([recipe, *args, "--quiet"]):
        sys.exit(f"lowmem-train {' '.join(args)} failed")
"""


def whole_and_resumed(recipe: str, tmp_path: Path) -> tuple[Path, Path]:
    """The run directories of ``recipe`` run in a process killed during step 5 (:data:`CRASH_AFTER`) then
    resumed with ``--resume`` in a new one, and run whole. The whole run follows the resume in that new
    process (one interpreter start less; the resume still finds a fresh process)."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    crash = subprocess.run([sys.executable, "-c", CRASH_AFTER, recipe, f"output.dir={broken}"],
                           capture_output=True, text=True)
    assert crash.returncode == 17, crash.stderr[-2000:]
    assert max(_losses(broken)) == 4  # it really died after step 4, past the checkpoint at step 3
    done = subprocess.run([sys.executable, "-c", RESUME_THEN_WHOLE, recipe, str(broken), str(whole)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return whole, broken


RESUME_CASES = {
    "adamw": {},
    # a projection refresh (every 2 steps) falls across the interruption
    "galore_adamw": {"optim": {"name": "galore_adamw", "args": {"rank": 4, "update_proj_gap": 2}}},
    "frugal": {"optim": {"name": "frugal", "args": {"density": 0.25, "update_proj_gap": 2}}},
    "adamw8bit": {"optim": {"name": "adamw8bit", "args": {"fp32_state_params": []}}},
    "sgd_sai": {"optim": {"name": "sgd_sai", "lr": 1e-3}},  # the g-SNR of step 1 must survive the restart
    "swan": {"optim": {"name": "swan", "args": {"lr_scale": 1.0}}},
    "sinkgd_layerwise": {"optim": {"name": "sinkgd", "layerwise": True, "max_grad_norm": None}},
    "wta_crs": {"activations": {"wta_crs": {"keep_ratio": 0.3}}},
    "wta_crs_lean": {"activations": {"wta_crs": {"keep_ratio": 0.3}, "lean": True}},
    "mezo": {"optim": {"name": "mezo", "lr": 1e-3, "args": {"eps": 1e-3}}},
    "zo_adamu": {"optim": {"name": "zo_adamu", "lr": 1e-3, "args": {"eps": 1e-3, "t1": 2, "t2": 4}}},
    # int8 host copy: the stored payload and scales travel in the checkpoint (fp32 copies: engine tests)
    "zo2_nvme_int8": {"optim": {"name": "mezo", "lr": 1e-3, "args": {"eps": 1e-3}},
                      "offload": {"enabled": True, "host_memory_budget_gb": 0, "nvme_dir": "NVME",
                                  "host_dtype": "int8"}},
    "fuyou_nvme": {"optim": {"name": "apollo_mini", "lr": 1e-3, "max_grad_norm": None},
                   "offload": {"enabled": True, "host_memory_budget_gb": 0, "nvme_dir": "NVME"}},
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_in_new_process_is_bit_exact(tiny_recipe, tmp_path, case):
    sections = {k: dict(v) for k, v in RESUME_CASES[case].items()}
    if "offload" in sections:
        sections["offload"]["nvme_dir"] = str(tmp_path / "nvme")
    whole, broken = whole_and_resumed(tiny_recipe(**sections), tmp_path)
    assert _losses(broken) == _losses(whole)  # every step's loss, bit for bit
    a, b = saved_tensors(whole / "model"), saved_tensors(broken / "model")  # offload: shards
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _trainer(recipe_path, *overrides):
    return Trainer(load_recipe(recipe_path, list(overrides)), progress=False)


def test_non_finite_loss_and_grad_skip_the_step_untouched(tiny_recipe):
    trainer = _trainer(tiny_recipe(), "train.steps=3", "output.save_model=false")
    run = trainer.run
    clean_loss = run.stepper.loss_fn
    calls = {"n": 0}

    def faulty(model, batch):
        calls["n"] += 1
        loss = clean_loss(model, batch)
        if calls["n"] == 2:  # attempt 2: a NaN loss
            return loss * float("nan")
        if calls["n"] == 3:  # attempt 3: finite loss, NaN gradient in one weight
            loss.register_hook(lambda g: g)
            weight = next(run.model.parameters())
            weight.register_hook(lambda g: torch.full_like(g, float("nan"))) if calls["n"] == 3 else None
        return loss

    run.stepper.loss_fn = faulty
    trainer.out.mkdir(parents=True, exist_ok=True)
    first = trainer.train_step()
    assert not first.get("skipped")
    params = [p.detach().clone() for p in run.model.parameters()]
    state = {k: v.clone() for k, v in run.inner_optimizer.state[next(run.model.parameters())].items()}
    for expected_bad in (1, 2):
        record = trainer.train_step()
        assert record["skipped"] and record["bad_steps"] == expected_bad
        assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), params))
        after = run.inner_optimizer.state[next(run.model.parameters())]
        assert all(torch.equal(after[k], v) for k, v in state.items())
        assert all(p.grad is None for p in run.model.parameters())
    assert trainer.step == 1 and trainer.attempt == 3


def test_too_many_bad_steps_stop_with_a_checkpoint(tiny_recipe):
    trainer = _trainer(tiny_recipe(), "train.max_bad_steps=2")
    clean = trainer.run.stepper.loss_fn
    trainer.run.stepper.loss_fn = lambda m, b: clean(m, b) * (float("nan") if trainer.step >= 2 else 1.0)
    with pytest.raises(TrainingStopped, match=r"train.max_bad_steps: 2 non-finite steps in a row after step 2"):
        trainer.train()
    lines = [json.loads(x) for x in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in lines if r.get("skipped")] == [1, 2]
    assert (trainer.out / "checkpoints" / "step-00000002" / "manifest.json").exists()


def test_saved_model_loads_with_transformers(tiny_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    _cli(tiny_recipe(), f"output.dir={tmp_path / 'out'}", "train.steps=2")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert model.config.model_type == "llama"
    assert summary["steps"] == 2 and summary["eval_loss"] < summary["eval_loss_before"]


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_lean_activations_train_as_the_plain_modules(tiny_recipe, tmp_path, precision):
    """activations.lean changes what backward keeps, not the math: the same step and eval losses."""
    recipe = tiny_recipe(train={"mixed_precision": precision})
    runs = {}
    for lean in (False, True):
        out = tmp_path / str(lean)
        _trainer(recipe, f"output.dir={out}", "output.save_model=false", "train.checkpoint_every=0",
                 f"activations.lean={str(lean).lower()}").train()
        runs[lean] = json.loads((out / "summary.json").read_text()), _losses(out)
    (summary, losses), (lean_summary, lean_losses) = runs[False], runs[True]
    assert losses.keys() == lean_losses.keys() and len(losses) == 6
    assert lean_losses[1] == losses[1]  # the forward is the model's own, bit for bit
    rtol = 1e-5 if precision == "no" else 2e-3  # later steps follow gradients equal to rounding
    for step, loss in losses.items():
        assert lean_losses[step] == pytest.approx(loss, rel=rtol), step
    assert lean_summary["eval_loss"] == pytest.approx(summary["eval_loss"], rel=rtol)


CHUNKED_CASES = {
    "adamw": ({}, 1e-5),
    "mezo": ({"optim": {"name": "mezo", "lr": 1e-3, "args": {"eps": 1e-3}}}, 1e-5),
    "wta_crs": ({"activations": {"wta_crs": {"keep_ratio": 0.3}}}, 1e-5),
    "checkpointing_bf16": ({"model": {"gradient_checkpointing": True}, "train": {"mixed_precision": "bf16"}}, 1e-4),
    "lora": ({"model": {"lora": {"r": 4}}}, 1e-5),  # the peft wrapper's forward runs the HF model's
}


@pytest.mark.parametrize("case", CHUNKED_CASES)
def test_chunked_loss_trains_as_the_models_loss(tiny_recipe, tmp_path, case):
    """train.loss_chunk_tokens (13: does not divide the 2 x 31 predicted tokens) gives the same
    step and eval losses, composed with a zeroth-order closure, WTA-CRS, checkpointing and bf16, LoRA."""
    sections, rtol = CHUNKED_CASES[case]
    recipe = tiny_recipe(**sections)
    runs = {}
    for name, extra in [("full", []), ("chunked", ["train.loss_chunk_tokens=13"])]:
        out = tmp_path / name
        _trainer(recipe, f"output.dir={out}", "output.save_model=false", "train.checkpoint_every=0", *extra).train()
        runs[name] = json.loads((out / "summary.json").read_text()), _losses(out)
    (summary, losses), (chunked_summary, chunked_losses) = runs["full"], runs["chunked"]
    assert losses.keys() == chunked_losses.keys() and len(losses) == 6
    for step, loss in losses.items():
        assert chunked_losses[step] == pytest.approx(loss, rel=rtol), step
    assert chunked_summary["eval_loss"] == pytest.approx(summary["eval_loss"], rel=rtol)


def test_zeroth_order_steps_run_without_dropout(tiny_recipe, tmp_path):
    """In-memory MeZO under lowmem-train equals the ZO2 engine on a model with dropout (OPT, 0.1): both
    difference two forwards of the same function, so neither may draw dropout masks (issue 19)."""
    opt = {"config": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "vocab_size": 257, "max_position_embeddings": 128,
                      "word_embed_proj_dim": 32, "dropout": 0.1, "attention_dropout": 0.1},
           "tokenizer": "bytes"}
    sections = {"model": opt, "optim": {"name": "mezo", "lr": 1e-3, "args": {"eps": 1e-3}},
                "train": {"steps": 3, "checkpoint_every": 0, "eval_every": 0}, "output": {"save_model": False}}
    memory = _trainer(tiny_recipe(**sections), f"output.dir={tmp_path / 'memory'}").train()
    offload = {"enabled": True, "host_memory_budget_gb": 1}
    zo2 = _trainer(tiny_recipe("zo2.yaml", **sections, offload=offload), f"output.dir={tmp_path / 'zo2'}").train()
    assert _losses(tmp_path / "memory") == _losses(tmp_path / "zo2")
    assert memory["eval_loss"] == zo2["eval_loss"]


def test_offloaded_run_builds_its_model_streamed(tiny_recipe, tmp_path):
    """With ``offload.enabled`` the run's model is built streamed (lowmem.block_source: blocks filled one by
    one as the engine stores them) and the engine holds the in-memory build's weights."""
    from lowmem.block_source import block_filler

    mezo = {"name": "mezo", "lr": 1e-3, "args": {"eps": 1e-3}}
    offload = {"enabled": True, "host_memory_budget_gb": 0, "nvme_dir": str(tmp_path / "nvme")}
    streamed = _trainer(tiny_recipe("zo2.yaml", optim=mezo, offload=offload), f"output.dir={tmp_path / 'a'}").run
    memory = _trainer(tiny_recipe(optim=mezo), f"output.dir={tmp_path / 'b'}").run
    assert block_filler(streamed.model) is not None and block_filler(memory.model) is None
    stored, expected = streamed.stepper.engine.model_state_dict(), memory.model.state_dict()
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in expected)
