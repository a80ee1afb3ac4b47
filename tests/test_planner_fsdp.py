"""The per-rank plan under FSDP2 (``--plan`` with ``train.distributed: fsdp2``, issue 26) against the
per-rank peak RSS measured on 2 gloo processes (``lowmem.tools.measure_fsdp`` under torchrun).

* rank 0's parameter, gradient and state bytes are the one-process ones split by rows (elementwise
  state) or whole (the state of a matrix stepped whole is replicated);
* the predicted peak is within 15% of each rank's measured peak RSS over 2 steps, for an
  elementwise optimizer (AdamW) and a whole-matrix one (APOLLO), on a model whose RSS is mostly
  weights, gradients and state (the runtime is about 0.4 GiB of 1 GiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowmem.memory import tensor_bytes
from lowmem.models import load_model
from lowmem.planner import format_plan, model_config, plan, plan_fsdp2, processes_of
from lowmem.planner.fsdp import _layout
from tests.test_planner import MEDIUM, SMALL, make_recipe

ROOT = Path(__file__).resolve().parents[1]
WIDE = {**MEDIUM, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8}  # 58 M parameters


def test_rank_bytes_are_the_shards_of_the_one_process_bytes(tmp_path):
    adamw = make_recipe(tmp_path, "train.distributed=fsdp2", config=SMALL, seq=32)
    one, two = plan(adamw, "cpu", suggest=False), plan_fsdp2(adamw, 2)
    assert two.processes == 2 and "rank 0 of 2 FSDP2 processes" in format_plan(two)
    # even row counts: exactly half, but for what every rank holds whole: the buffers (rotary frequencies)
    # and AdamW's step counters (an fp32 scalar per tensor: 9 a block, embedding, norm)
    assert two.totals["gradients"] * 2 == one.totals["gradients"]
    buffers = sum(tensor_bytes(b) for b in load_model(adamw.model).buffers())
    assert two.totals["weights"] * 2 - one.totals["weights"] == buffers > 0
    assert two.totals["optimizer_states"] * 2 - one.totals["optimizer_states"] == 4 * (9 * 2 + 2)
    apollo = make_recipe(tmp_path, "train.distributed=fsdp2", "optim.name=apollo", "optim.args={rank: 4}",
                         config=SMALL, seq=32)
    whole, sharded = plan(apollo, "cpu", suggest=False), plan_fsdp2(apollo, 2)
    # the AdamW groups' (embedding, norms) state halves; the projected state of the blocks' matrices does not
    assert whole.totals["optimizer_states"] / 2 < sharded.totals["optimizer_states"] < whole.totals["optimizer_states"]
    assert sharded.parts["all_gathered"] > 0


@pytest.mark.parametrize("overrides, gathered", [
    (["optim.name=frugal", "optim.args={proj_type: svd}"], "mlp.gate_proj"),  # at its SVD switch: every matrix
    (["optim.name=frugal", "optim.args={proj_type: columns}"], None),  # the chosen columns all-reduced
    (["optim.name=apollo", "optim.args={rank: 4}"], None),  # its random projection all-reduced
    (["optim.name=swan"], "mlp.down_proj"),  # whole every step: the wide and square matrices
    (["optim.name=swan", "optim.target_modules=['*gate_proj', '*up_proj']"], None),  # tall: sums over the rows
])
def test_the_step_phase_counts_the_gradients_a_rank_gathers(tmp_path, overrides, gathered):
    """``M_max`` of the step phase is the largest matrix whose whole gradient a rank all-gathers (what each rule
    sends is counted in tests/integrations/test_fsdp_exchange.py), none where the rule puts its whole-matrix
    quantities together by all-reduces."""
    recipe = make_recipe(tmp_path, "train.distributed=fsdp2", *overrides, config=SMALL, seq=32)
    model = load_model(recipe.model)
    expected = 0 if gathered is None else tensor_bytes(model.get_submodule(f"model.layers.0.{gathered}").weight)
    assert _layout(recipe, model_config(recipe.model), 2, "cpu")["whole_matrix"] == expected


def test_processes_come_from_the_flag_or_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert processes_of(None) == 4 and processes_of(2) == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert processes_of(None) == 1
    with pytest.raises(ValueError, match="--processes: must be >= 1"):
        processes_of(0)


def test_rank_peak_rss_within_15_percent_on_two_processes(tmp_path):
    recipes = {name: make_recipe(tmp_path, "train.distributed=fsdp2", *overrides, config=WIDE) for name, overrides in
               [("adamw", ["optim.name=adamw"]), ("apollo", ["optim.name=apollo", "optim.args={rank: 16}"]),
                ("lora", ["optim.name=adamw", "model.lora={r: 16}"])]}
    paths = []
    for name, recipe in recipes.items():
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(recipe.model_dump()))
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowmem.tools.measure_fsdp",
           *map(str, paths)]
    running = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    predicted = {name: plan_fsdp2(recipe, 2).peak_bytes for name, recipe in recipes.items()}
    out, err = running.communicate(timeout=600)
    assert running.returncode == 0, err[-3000:]
    reports = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    for name, report in zip(recipes, reports, strict=True):
        for peak in report["peak_rss"]:
            assert abs(predicted[name] - peak) <= 0.15 * peak, (name, predicted[name] / 2**20, peak / 2**20)
