"""Data parallel on 2 CPU processes (gloo) equals 1 process with the same global batch.

Rank r of N takes micro-batch ``position * N + r`` and DDP averages the gradients, so step k
of a 2-process run with ``grad_accum=1`` sees micro-batches 2k and 2k+1 -- exactly what one
process with ``grad_accum=2`` accumulates (each micro-batch loss / 2). The reference is that
1-process run; the 2-process runs are the documented commands (``accelerate launch -m
lowmem.cli`` and ``torchrun``), and must exit cleanly. A 2-process run resumed from its
mid-run checkpoint ends bit-identical to the uninterrupted one, also with WTA-CRS, whose
sampler each rank seeds on its own (the checkpoint keeps every rank's generator state).
The chunked LM loss (``train.loss_chunk_tokens``) runs the DDP-wrapped forward, so DDP averages
its gradients too: 2 processes with it equal 1 process with the model's own loss.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem.checkpoint import CheckpointError
from lowmem.recipe import load_recipe
from lowmem.trainer import train

WORKER = Path(__file__).with_name("ddp_worker.py")
LAUNCHERS = {
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lowmem.cli"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(WORKER)],
}


def _launch(launcher: str, recipe: str, out: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = LAUNCHERS[launcher] + [recipe, "train.grad_accum=1", f"output.dir={out}", *extra]
    if launcher == "accelerate":
        cmd.append("--quiet")
    # from the repository root, as the README runs it (the root is then first on sys.path)
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=300)
    log = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, log
    for crash in ("terminate called", "Aborted", "Traceback"):
        assert crash not in done.stderr, log


def _reference(recipe: str, out: Path) -> dict:
    return train(load_recipe(recipe, ["train.grad_accum=2", f"output.dir={out}"]), progress=False)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("optim, launcher, extra", [
    ({"name": "adamw", "lr": 1e-3}, "accelerate", []),
    ({"name": "apollo", "lr": 1e-3, "args": {"rank": 4, "update_proj_gap": 2}}, "torchrun", []),
    ({"name": "adamw", "lr": 1e-3}, "torchrun", ["train.loss_chunk_tokens=13"]),
    ({"name": "sgd_sai", "lr": 1e-3}, "accelerate", []),  # the g-SNR of the averaged gradient
    ({"name": "swan", "lr": 1e-3, "args": {"lr_scale": 1.0}}, "torchrun", []),
], ids=["adamw", "apollo", "adamw-chunked-loss", "sgd_sai", "swan"])
def test_two_processes_equal_one(tiny_recipe, tmp_path, optim, launcher, extra):
    recipe = tiny_recipe(optim=optim, train={"steps": 4, "checkpoint_every": 0})
    summary = _reference(recipe, tmp_path / "one")
    _launch(launcher, recipe, tmp_path / "two", *extra)

    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    _assert_same_weights(two, one)
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two_summary["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert two_summary["eval_loss"] < two_summary["eval_loss_before"]
    if launcher == "torchrun":  # every replica holds the same weights (and projections) at the end
        ranks = [load_file(tmp_path / "two" / f"rank{r}.safetensors") for r in range(2)]
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), key
        _assert_same_weights(ranks[0], one)


@pytest.mark.parametrize("optim, activations", [
    ({"name": "apollo", "lr": 1e-3, "args": {"rank": 4, "update_proj_gap": 3}}, {}),
    ({"name": "adamw", "lr": 1e-3}, {"wta_crs": {"keep_ratio": 0.3}}),
], ids=["apollo", "wta_crs"])
def test_two_process_resume_is_exact(tiny_recipe, tmp_path, optim, activations):
    recipe = tiny_recipe(optim=optim, activations=activations, train={"steps": 4, "checkpoint_every": 2})
    _launch("torchrun", recipe, tmp_path / "full")
    step2 = Path("checkpoints") / "step-00000002"
    shutil.copytree(tmp_path / "full" / step2, tmp_path / "cut" / step2)  # as if stopped after step 2
    _launch("torchrun", recipe, tmp_path / "cut", "--resume")
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3, 4]  # it did resume, it did not start over
    for r in range(2):
        full = load_file(tmp_path / "full" / f"rank{r}.safetensors")
        resumed = load_file(tmp_path / "cut" / f"rank{r}.safetensors")
        for key in full:
            assert torch.equal(resumed[key], full[key]), (r, key)
    if activations:
        rng = load_file(tmp_path / "cut" / step2 / "rng.safetensors")
        states = [rng[f"rank{r}.generator.wta_crs"] for r in range(2)]
        assert not torch.equal(*states)  # the ranks' samplers differ: rank 0's alone cannot resume rank 1
        with pytest.raises(CheckpointError, match="saved by 2 processes, this run has 1"):  # (5: not complete)
            train(load_recipe(recipe, [f"output.dir={tmp_path / 'cut'}", "train.steps=5"]), resume=True,
                  progress=False)


def test_eval_batches_not_a_multiple_of_the_processes(tiny_recipe, tmp_path):
    """1 eval batch on 2 processes (the issue's case): rank 1 has none. It used to deadlock at the step-0
    evaluation (no forward, and a shorter tensor in the reduce); now every rank runs the same forwards (the
    spare one weighted 0) and the eval mean is one process's, before and after training."""
    recipe = tiny_recipe(train={"steps": 1, "checkpoint_every": 0, "eval_batches": 1})
    one = _reference(recipe, tmp_path / "one")
    _launch("accelerate", recipe, tmp_path / "two")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key in ("eval_loss_before", "eval_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def test_sft_two_processes_equal_one(tiny_recipe, tmp_path):
    """data.task: sft (prompt/completion records, packed rows with restarting position_ids, loss on the
    completions only) on 2 processes equals 1 process with grad_accum 2, as the LM task does."""
    records = [{"prompt": f"Echo {w} {i}", "completion": f"{w} {i}"}
               for i, w in enumerate(["market", "match", "film", "election", "phone"] * 8)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = tiny_recipe(data={"task": "sft", "path": str(data), "eval_fraction": 0.2},
                         optim={"name": "adamw", "lr": 1e-3},
                         train={"steps": 4, "checkpoint_every": 0, "seq_len": 96, "eval_batches": 2})
    summary = _reference(recipe, tmp_path / "one")
    _launch("accelerate", recipe, tmp_path / "two")
    _assert_same_weights(load_file(tmp_path / "two" / "model" / "model.safetensors"),
                         load_file(tmp_path / "one" / "model" / "model.safetensors"))
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two_summary["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert two_summary["eval_loss"] < two_summary["eval_loss_before"]


def test_quantized_base_two_processes_equal_one(tiny_recipe, tmp_path):
    """QLoRA under DDP: each process quantizes the config-built base itself (through its own temporary
    directory: transformers' save_pretrained writes only on rank 0 under a launcher, so it is not used there)
    and the two processes train the adapters one process trains. Int8 weights are refused in one line."""
    recipe = tiny_recipe(model={"quantize": {"bits": 4}, "lora": {"r": 4}}, train={"steps": 3, "checkpoint_every": 0})
    summary = _reference(recipe, tmp_path / "one")
    _launch("torchrun", recipe, tmp_path / "two")
    files = sorted(p.name for p in (tmp_path / "one" / "model").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "two" / "model").glob("*.safetensors"))
    for name in files:
        _assert_same_weights(load_file(tmp_path / "two" / "model" / name), load_file(tmp_path / "one" / "model" / name))
    two_summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two_summary["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    int8 = [recipe, "model.dtype=int8", "model.quantize=null", "model.lora=null", f"output.dir={tmp_path / 'int8'}"]
    done = subprocess.run(LAUNCHERS["accelerate"] + int8 + ["--quiet"], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = {x for x in done.stderr.splitlines() if x.startswith("lowmem-train: ")}
    assert done.returncode != 0 and len(lines) == 1 and "int8 weights train in one process" in lines.pop(), done.stderr
