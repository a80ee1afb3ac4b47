"""FSDP2 (``train.distributed: fsdp2``) on 2 CPU processes (gloo) equals 1 process with the same
global batch, for every optimizer and the features that change the model (issue 26).

Rank r of N takes micro-batch ``position * N + r`` and FSDP2's reduce-scatter averages the
gradients, so a 2-process first-order step with per-process batch b sees the micro-batches one
process with ``grad_accum: 2`` accumulates. A zeroth-order step (MeZO, ZO-AdaMU) takes one batch:
its reference is one process with batch 2b, and the 2 ranks perturb their shards with slices of the
one-process noise (each drawing only its slice, with generator chunks of 100 elements here so that
shards start and end inside chunks: lowmem.optim.zo_keyed) and average the loss over the global batch. The references are plain one-process
runs (no sharding); the 2-process runs share one ``torchrun`` launch (the worker loops over the
recipes) and must exit cleanly. Over 10 steps the logged training losses (the global batch's under
FSDP2) agree to a relative 1e-5 in fp32, and so does the final eval loss, over 3 eval batches: rank 1
repeats batch 0 with weight 0 so that both ranks run each sharded forward (lowmem.trainer.Trainer.evaluate)."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowmem.optim.zo_keyed as zo_keyed
from lowmem.checkpoint import SHARDED, CheckpointError
from lowmem.recipe import load_recipe
from lowmem.trainer import train

from .helpers import HF_TRAINER, hf_trainer_run

WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


def launch(runs: list, tmp_path: Path, *flags: str, processes: int = 2,
           worker: Path = WORKER) -> subprocess.CompletedProcess:
    """One torchrun launch of ``processes`` ranks of ``worker`` over ``runs`` ([recipe, overrides] pairs, or
    more: fsdp_worker.py) with the worker's ``flags``; asserts a clean exit."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout first
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(worker),
           str(spec), *flags]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, log
    for crash in ("terminate called", "Aborted", "Traceback"):
        assert crash not in done.stderr, log
    return done


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# name -> (optim section, per-process grad_accum under FSDP2); the one-process reference accumulates 2x.
# Each steps its local rows (sums over the shards all-reduced) or the all-gathered matrix (lowmem.optim.dtensor).
OPTIMIZERS = {
    "adamw": ({"name": "adamw", "lr": 1e-3, "max_grad_norm": 0.05}, 2),  # clipped, accumulating
    # 8-bit from 256 elements: every 2-D shard of the tiny model is 8-bit, in 256-element blocks
    "adamw8bit": ({"name": "adamw8bit", "lr": 1e-3, "args": {"min_8bit_size": 256}}, 1),
    "sgd8bit": ({"name": "sgd8bit", "lr": 1e-2, "args": {"min_8bit_size": 256}}, 1),
    "galore": ({"name": "galore_adamw", "lr": 1e-3, "args": {"rank": 4, "update_proj_gap": 3}}, 1),  # SVD refresh
    "apollo": ({"name": "apollo", "lr": 1e-3, "args": {"rank": 4, "update_proj_gap": 3}}, 1),
    "apollo_mini": ({"name": "apollo_mini", "lr": 1e-3}, 1),
    "frugal-block": ({"name": "frugal", "lr": 1e-3, "args": {"update_proj_gap": 3}}, 1),
    "frugal-svd": ({"name": "frugal", "lr": 1e-3, "args": {"update_proj_gap": 3, "proj_type": "svd"}}, 1),
    **{f"frugal-{kind}": ({"name": "frugal", "lr": 1e-3, "args": {"update_proj_gap": 3, "proj_type": kind}}, 1)
       for kind in ("columns", "rows", "randk")},  # chosen columns cross every shard; random: as svd's
    "sgd_sai": ({"name": "sgd_sai", "lr": 1e-3}, 1),
    "sinkgd": ({"name": "sinkgd", "lr": 1e-3}, 1),
    "swan": ({"name": "swan", "lr": 1e-3, "args": {"lr_scale": 1.0}}, 1),
}


def first_order(optim: dict, accum: int = 1, **sections) -> tuple:
    """A case: the 1-process reference accumulates twice the 2-process run's micro-batches."""
    return {"optim": optim, **sections}, [f"train.grad_accum={accum}"], [f"train.grad_accum={2 * accum}"]


def zeroth_order(optim: dict) -> tuple:
    """A case: a zeroth-order step takes one batch, so the reference takes batch 2b (4 rows) and one
    eval batch of 4 rows: the rows the 2 ranks take (2 train rows each; eval batches 0 and 1)."""
    return {"optim": optim}, ["train.eval_batches=2"], ["train.batch_size=4", "train.eval_batches=1"]


ADAMW = {"name": "adamw", "lr": 1e-3}
ZO_CHUNK = 100  # elements per noise generator: the tiny model's shards (e.g. 129 of 257 rows of 32) cut chunks
ZEROTH_ORDER = ("mezo", "zo_adamu")
# name -> (recipe sections, overrides of the 2-process FSDP2 run, overrides of the 1-process reference)
CASES = {name: first_order(optim, accum) for name, (optim, accum) in OPTIMIZERS.items()}
CASES.update({
    # MeZO and ZO-AdaMU on shards: each rank perturbs its rows with its slice of the one-process z
    "mezo": zeroth_order({"name": "mezo", "lr": 2e-3, "args": {"eps": 0.1}}),
    "mezo-momentum": zeroth_order({"name": "mezo", "lr": 1e-3, "weight_decay": 0.1,
                                   "args": {"eps": 0.1, "momentum": 0.9, "n_samples": 2, "noise": "table"}}),
    # T1 = 0: the annealed phase with a stored momentum (on the shard) from the first step
    "zo_adamu": zeroth_order({"name": "zo_adamu", "lr": 3e-4, "args": {"eps": 0.1, "t1": 0, "noise": "philox"}}),
    # the features that change the model or the trained set, with AdamW
    "lean": first_order(ADAMW, activations={"lean": True}),
    "checkpointing": first_order(ADAMW, model={"gradient_checkpointing": True}),
    "lora": first_order(ADAMW, model={"lora": {"r": 4}}),
    "trainable": first_order(ADAMW, model={"trainable": ["*norm*", "*q_proj*"]}),
})
# the chunked loss calls the root's lm_head (tied to the embedding) after the sharded forward, accumulating
CHUNKED = ["train.loss_chunk_tokens=16", "model.config.tie_word_embeddings=true"]
_sections, _two, _one = first_order(ADAMW, 2)
CASES["chunked-loss"] = (_sections, _two + CHUNKED, _one + CHUNKED)


# WTA-CRS samples activation rows on each rank from its own generator (as under DDP): the estimator of
# b rows per rank, not one process's of 2b rows, so it is checked to train on shards, not to equal one process
SAMPLED = {"wta_crs": {"optim": ADAMW, "activations": {"wta_crs": {"keep_ratio": 0.3}}}}
# transformers.Trainer + LowMemCallback on a model sharded by lowmem.shard_for_trainer (elementwise and whole-matrix)
HF_OPTIMIZERS = ("adamw", "apollo_mini", "mezo")  # mezo: ZOTrainer


def test_two_processes_equal_one(tiny_recipe, tmp_path, monkeypatch):
    # the 8-bit steps on the PyTorch path here and in the workers (the Triton interpreter is for the kernel tests)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(zo_keyed, "CHUNK", ZO_CHUNK)  # and in the workers: --zo-chunk
    runs = [[HF_TRAINER, {"optimizer": name, "output_dir": str(tmp_path / "hf" / name)}] for name in HF_OPTIMIZERS]
    hf_expected = {name: hf_trainer_run(name, str(tmp_path / "hf-one" / name)) for name in HF_OPTIMIZERS}
    expected = {}
    for name, (sections, two, one) in CASES.items():
        recipe = tiny_recipe(f"{name}.yaml", **sections, train={"steps": STEPS, "checkpoint_every": 0,
                                                               "eval_batches": 3})  # not a multiple of 2
        runs.append([recipe, [f"output.dir={tmp_path / name / 'two'}", "train.distributed=fsdp2", *two]])
        expected[name] = train(load_recipe(recipe, [f"output.dir={tmp_path / name / 'one'}", *one]), progress=False)
    for name, sections in SAMPLED.items():
        recipe = tiny_recipe(f"{name}.yaml", **sections, train={"steps": STEPS, "checkpoint_every": 0})
        runs.append([recipe, [f"output.dir={tmp_path / name / 'two'}", "train.distributed=fsdp2"]])
    launch(runs, tmp_path, "--zo-chunk", str(ZO_CHUNK))
    for name in SAMPLED:
        summary = json.loads((tmp_path / name / "two" / "summary.json").read_text())
        assert len(losses(tmp_path / name / "two")) == STEPS and summary["eval_loss"] < summary["eval_loss_before"]
    for name in CASES:
        one, two = losses(tmp_path / name / "one"), losses(tmp_path / name / "two")
        assert len(two) == STEPS, name
        assert two == pytest.approx(one, rel=1e-5), name
        summary = json.loads((tmp_path / name / "two" / "summary.json").read_text())
        assert summary["eval_loss"] == pytest.approx(expected[name]["eval_loss"], rel=1e-5), name
        if CASES[name][0]["optim"]["name"] in ZEROTH_ORDER:  # 10 random directions: the weights moved
            assert summary["eval_loss"] != pytest.approx(summary["eval_loss_before"], rel=1e-6), name
        else:
            assert summary["eval_loss"] < summary["eval_loss_before"], name
    for name in HF_OPTIMIZERS:
        two = json.loads((tmp_path / "hf" / name / "losses.json").read_text())
        assert len(two["losses"]) == STEPS, name
        assert two["losses"] == pytest.approx(hf_expected[name]["losses"], rel=1e-5), name
    # LowMemCallback logs this rank's optimizer state: half of AdamW's moments
    half = json.loads((tmp_path / "hf" / "adamw" / "losses.json").read_text())["optimizer_state_mb"]
    assert 0.49 < half / hf_expected["adamw"]["optimizer_state_mb"] < 0.52
    # the state of an elementwise optimizer is sharded: each rank holds about half (257-row embedding: 129 rows)
    one, two = expected["adamw"], json.loads((tmp_path / "adamw" / "two" / "summary.json").read_text())
    assert two["optimizer_state_mb"] == pytest.approx(one["optimizer_state_mb"], abs=2e-3)  # MiB to 3 places
    assert 0.49 < two["optimizer_state_mb_per_rank"] / one["optimizer_state_mb"] < 0.52


@pytest.mark.parametrize("overrides, message", [
    (["optim.layerwise=true", "optim.max_grad_norm=null"], "optim.layerwise updates inside backward"),
    (["offload.enabled=true", "optim.max_grad_norm=null"], "the offload engines"),
    (["optim.name=mezo", "train.grad_accum=1", "offload.enabled=true"], "the offload engines"),  # ZO2
    (["optim.name=mezo", "train.grad_accum=2"], "zeroth-order optimizers take one batch per step"),
    (["model.quantize={bits: 4}", "model.lora={r: 4}"], "a quantized base (model.quantize) is not sharded"),
    (["model.dtype=int8"], "int8 weights (model.dtype: int8) are not sharded"),
], ids=["layerwise", "offload", "zo2-offload", "zeroth-order-accumulation", "quantized-base", "int8-weights"])
def test_unsupported_combinations_are_one_line(tiny_recipe, tmp_path, capsys, overrides, message):
    from lowmem.cli import main

    code = main([tiny_recipe(), "train.distributed=fsdp2", f"output.dir={tmp_path / 'run'}", *overrides, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


RESUMED = {  # one optimizer per state layout of lowmem.fsdp_checkpoint
    "adamw": {"name": "adamw", "lr": 1e-3},                                        # DTensor moments
    "apollo": {"name": "apollo", "lr": 1e-3, "args": {"rank": 4, "update_proj_gap": 3}},  # replicated + shards
    "adamw8bit": {"name": "adamw8bit", "lr": 1e-3, "args": {"min_8bit_size": 256}},     # per-rank 8-bit blocks
    # 64-element blocks, lm_head's moments fp32: every shard at 1, 2 and 4 processes starts on a block, so
    # the shards' blocks are the one-process blocks (lm_head's 257 rows are not: 129 x 32 elements)
    "adamw8bit-blocks": {"name": "adamw8bit", "lr": 1e-3, "args": {
        "min_8bit_size": 64, "blocksize": 64, "fp32_state_params": ["*embed*", "*lm_head*"]}},
    "zo_adamu": {"name": "zo_adamu", "lr": 3e-4, "args": {"eps": 0.1, "t1": 0}},  # shard momentum + ZO generator
    "mezo": {"name": "mezo", "lr": 1e-3, "args": {"eps": 0.1, "momentum": 0.9}},  # MeZO's own momentum, likewise
}
# the layouts resharded (8-bit blocks re-dealt), resumed on 1 process
RESHARDED = ("adamw", "apollo", "adamw8bit-blocks", "zo_adamu", "mezo")
ON_FOUR = ("adamw", "apollo", "adamw8bit-blocks", "zo_adamu")  # and on 4 (MeZO's layouts are ZO-AdaMU's)
# the 2-process run's global batch (2 rows per rank) on 1 and 4 processes; a zeroth-order step takes one batch
GLOBAL_BATCH = {1: (["train.grad_accum=2"], ["train.batch_size=4"]),
                4: (["train.batch_size=1"], ["train.batch_size=1"])}


def resumed_tolerance(name: str, processes: str) -> tuple[float, float]:
    """How far a run resumed on another number of processes may go from the uninterrupted 2-process
    run over 5 steps: relative (losses, weights) and absolute (weights); the resumed state itself is
    the saved one bit for bit. 1 process with ``grad_accum: 2`` sums the gradient almost as 2 processes
    do (weights within 1e-8), and a zeroth-order loss is a float64 mean: 1e-5 (measured: up to 8e-8).
    On 4 processes of 1 row each, a first-order gradient is summed in another order, and Adam's
    ``m / sqrt(v)`` (APOLLO's scaled Adam too) turns the fp32 rounding of near-zero gradient elements
    into lr-sized differences, as a rounding difference that moves an 8-bit moment across a code
    boundary does on 1 process: 1e-4 (measured: losses 2.4e-5, weights 5.5e-5 at most; a lost moment
    would move the weights by ~lr = 1e-3 a step)."""
    amplified = RESUMED[name]["name"] == "adamw8bit" or (
        processes == "four" and RESUMED[name]["name"] not in ZEROTH_ORDER)
    return (1e-4, 1e-4) if amplified else (1e-5, 1e-6)


def global_batch(name: str, processes: int) -> list[str]:
    first, zeroth = GLOBAL_BATCH[processes]
    return zeroth if RESUMED[name]["name"] in ZEROTH_ORDER else first


def test_resume_exact_and_on_another_world_size(tiny_recipe, tmp_path, monkeypatch):
    """Stopped after step 5 (its checkpoint copied alone, as if killed), resumed on 2 processes: the
    same final weights bit for bit. Resumed on 1 and on 4 processes (the same global batch; MeZO on 1):
    the fp32 layouts, the ZO state (shard momentum, seed generator) and 8-bit blocks that are the
    one-process blocks load resharded bit for bit (the step-5 checkpoint loaded on 4 processes and saved
    again holds the same numbers) and the run goes on as the uninterrupted one, to rounding (the gradient
    or the loss is summed in another order). 8-bit shards whose blocks depend on the layout are refused
    in one line on 1 and on 4."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    recipes = {name: tiny_recipe(f"{name}.yaml", optim=optim, train={"steps": STEPS, "checkpoint_every": 5,
                                                                        "distributed": "fsdp2"})
               for name, optim in RESUMED.items()}
    step5 = Path("checkpoints") / "step-00000005"
    cut = {name: str(tmp_path / name / "full" / step5) for name in RESUMED}  # copied alone, as if killed after it
    launch([[r, [f"output.dir={tmp_path / n / 'full'}"]] for n, r in recipes.items()]
           + [[r, [f"output.dir={tmp_path / n / 'cut'}"], "resume", cut[n]] for n, r in recipes.items()], tmp_path)
    for name in RESUMED:
        assert sorted(os.listdir(tmp_path / name / "full" / "checkpoints")) == ["step-00000005", "step-00000010"]
        assert steps_logged(tmp_path / name / "cut") == [6, 7, 8, 9, 10]  # it resumed, it did not start over
        full = load_file(tmp_path / name / "full" / "model" / "model.safetensors")
        resumed = load_file(tmp_path / name / "cut" / "model" / "model.safetensors")
        for key in full:
            assert torch.equal(resumed[key], full[key]), (name, key)
    four = [[recipes[n], [f"output.dir={tmp_path / n / 'four'}", *global_batch(n, 4)], "resave", cut[n]]
            for n in ON_FOUR]  # the step-5 checkpoint loaded, saved again on 4 processes, then resumed
    four.append([recipes["adamw8bit"], [f"output.dir={tmp_path / 'adamw8bit' / 'four'}", "train.batch_size=1"],
                 "refused", cut["adamw8bit"]])
    launch(four, tmp_path, processes=4)
    for name in RESUMED:
        shutil.copytree(cut[name], tmp_path / name / "one" / step5)
    for name in RESHARDED:
        train(load_recipe(recipes[name], [f"output.dir={tmp_path / name / 'one'}", *global_batch(name, 1)]),
              resume=True, progress=False)
    for name in ON_FOUR:  # what 4 processes loaded, saved again: the 2-process checkpoint's numbers
        saved, resaved = (end_to_end(dcp_tensors(tmp_path / name / run / step5 / SHARDED))
                          for run in ("full", "four"))
        assert sorted(resaved) == sorted(saved), name
        for key in saved:
            assert torch.equal(resaved[key], saved[key]), (name, key)
    for name in RESHARDED:
        for processes in ("one", "four") if name in ON_FOUR else ("one",):
            assert_follows_uninterrupted(tmp_path / name, processes)
    refused = "8-bit optimizer state laid out on 2 shards; resume with 2 processes (a shard starts inside a block"
    assert refused in (tmp_path / "adamw8bit" / "four" / "refused.txt").read_text()
    with pytest.raises(CheckpointError, match=re.escape(refused)):
        train(load_recipe(recipes["adamw8bit"], [f"output.dir={tmp_path / 'adamw8bit' / 'one'}",
                                                 "train.grad_accum=2"]), resume=True, progress=False)


def assert_follows_uninterrupted(runs: Path, processes: str) -> None:
    """The run resumed in ``runs / processes`` logs steps 6 to 10, its first loss is the uninterrupted
    run's (the loaded weights), and its losses and final weights follow that run (resumed_tolerance)."""
    name = runs.name
    assert steps_logged(runs / processes) == [6, 7, 8, 9, 10], (name, processes)
    full, other = losses(runs / "full")[5:], losses(runs / processes)
    assert other[0] == pytest.approx(full[0], rel=1e-6), (name, processes)
    rel, atol = resumed_tolerance(name, processes)
    assert other == pytest.approx(full, rel=rel), (name, processes)
    full = load_file(runs / "full" / "model" / "model.safetensors")
    other = load_file(runs / processes / "model" / "model.safetensors")
    for key in full:
        torch.testing.assert_close(other[key], full[key], rtol=rel, atol=atol, msg=f"{name} on {processes} {key}")


def end_to_end(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with each rank's 8-bit pieces (``optim.rank{r}.NAME``) put end to end in rank order, as
    ``optim.NAME``: the one-process state when the shards' blocks are the one-process blocks."""
    out, pieces = {}, {}
    for key, t in tensors.items():
        found = re.fullmatch(r"optim\.rank(\d+)\.(.+)", key)
        if found:
            pieces.setdefault(found[2], {})[int(found[1])] = t.reshape(-1)
        else:
            out[key] = t
    return out | {f"optim.{name}": torch.cat([p[r] for r in sorted(p)]) for name, p in pieces.items()}


def dcp_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``torch.distributed.checkpoint`` directory, whole, read by this one process."""
    import torch.distributed.checkpoint as dcp

    entries = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in entries.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state


def steps_logged(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_plan_traces_the_whole_model_on_one_process(tiny_recipe, tmp_path, capsys):
    """``--plan`` under FSDP2 plans one rank (lowmem.planner.fsdp, tested against measured RSS in
    tests/test_planner_fsdp.py) from the one-process step traced on fake tensors: it runs, it does not
    shard fake tensors, and ``--processes`` sets the number of ranks."""
    from lowmem.cli import main

    assert main([tiny_recipe(), "train.distributed=fsdp2", f"output.dir={tmp_path / 'run'}", "--plan",
                 "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "rank 0 of 2 FSDP2 processes" in out and "all_gathered" in out


# decoder blocks 84% of the weights, the largest tensor 5%: what a rank holds besides its shards is one tensor
LOADED = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
          "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8000, "max_position_embeddings": 128,
          "tie_word_embeddings": False}


def test_only_rank0_holds_the_whole_model(tiny_recipe, tmp_path):
    """Under FSDP2 only rank 0 builds the whole model (rank 1 builds it on meta and receives its rows from rank
    0, lowmem.fsdp.load_from_rank0) and only rank 0 gathers it to save it: rank 1's build and save peaks are
    below rank 0's by most of the weights W (measured: W less the largest tensor, which each rank receives
    whole); before, both ranks built and gathered all of W. Rank 1's weights are rank 0's: the two-process
    run's first loss is the one-process run's (the step before any update)."""
    recipe = tiny_recipe(model={"config": LOADED}, train={"steps": 1, "checkpoint_every": 0, "eval_batches": 1})
    launch([[recipe, [f"output.dir={tmp_path / 'two'}", "train.distributed=fsdp2"]]], tmp_path)
    train(load_recipe(recipe, [f"output.dir={tmp_path / 'one'}", "train.grad_accum=2", "output.save_model=false"]),
          progress=False)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    weights = 2 * summary["parameter_mb_per_rank"] / 1024  # GiB: each rank holds half
    rank0, rank1 = summary["peak_rss_by_phase_gb_per_rank"]
    for phase in ("build", "save"):
        assert rank1[phase] < rank0[phase] - 0.6 * weights, (phase, rank0, rank1, weights)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
