"""``lowmem-train`` turns bad input into one line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import pytest


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lowmem.cli", *args, "--quiet"], capture_output=True, text=True)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lowmem-train: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("override, needles", [
    ("train.batchsize=2", ["train.batchsize", "unknown key"]),
    ("train.steps=many", ["train.steps"]),
    ("optim.name=adamm", ["optim.name", "adamm"]),
    ("optim.args.rank=0", ["rank"]),
])
def test_bad_recipe_fields(tiny_recipe, override, needles):
    recipe = tiny_recipe() if "rank" not in override else tiny_recipe(optim={"name": "galore_adamw"})
    _assert_one_line_error(_run(recipe, override), *needles)


@pytest.mark.parametrize("override, needle", [
    ("optim.args.rank=four", "optim.args.rank: must be a valid integer, got 'four'"),
    ("optim.args.eps=-1", "optim.args.eps: must be greater than or equal to 0, got -1"),
    ("optim.args.rnak=4", "optim.args.rnak: not an argument of optimizer 'galore_adamw'"),
])
def test_bad_optimizer_args_are_refused_before_the_model_loads(tiny_recipe, override, needle):
    """The model path does not exist: the optim.args line comes first, so nothing was loaded."""
    recipe = tiny_recipe(optim={"name": "galore_adamw"},
                         model={"path": "pkg:not_a_package_here", "config": None, "tokenizer": "bytes"})
    _assert_one_line_error(_run(recipe, override), needle)


def test_malformed_yaml_and_missing_recipe(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: {steps: 3\n")
    _assert_one_line_error(_run(str(bad)), "broken.yaml", "malformed YAML")
    _assert_one_line_error(_run(str(tmp_path / "absent.yaml")), "absent.yaml")


def test_missing_data_and_data_without_text(tiny_recipe, tmp_path):
    _assert_one_line_error(_run(tiny_recipe(), f"data.path={tmp_path / 'nowhere'}"), "data.path", "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    (empty / "b.jsonl").write_text('{"title": "no text field"}\n')
    _assert_one_line_error(_run(tiny_recipe(), f"data.path={empty / 'b.jsonl'}"), "b.jsonl:1", "text")
    (empty / "b.jsonl").unlink()
    _assert_one_line_error(_run(tiny_recipe(), f"data.path={empty}"), "data.path", "holds no text")


def test_missing_model_files(tiny_recipe, tmp_path):
    _assert_one_line_error(_run(tiny_recipe(model={"path": str(tmp_path), "gguf_file": "x.gguf", "config": None,
                                                   "tokenizer": "bytes"})), "model.gguf_file", "x.gguf")
    _assert_one_line_error(_run(tiny_recipe(model={"path": "pkg:not_a_package_here", "config": None,
                                                   "tokenizer": "bytes"})), "model.path", "not_a_package_here")


def test_corrupted_checkpoint_names_the_file(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    out = tmp_path / "run"
    assert _run(recipe, "train.steps=3").returncode == 0
    _assert_summary_has_the_planners_prediction(recipe, out)
    weights = out / "checkpoints" / "step-00000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    _assert_one_line_error(_run(recipe, "train.steps=4", "--resume"), str(weights), "sha256")


def _assert_summary_has_the_planners_prediction(recipe, out):
    """Issue 24: a CPU run's summary shows the predicted peak next to the measured one: the planner's plan of the
    recipe, with the runtime baseline measured in the CLI's own process instead of a fresh subprocess (the same
    imports but the model's modelling module: within 20 MiB)."""
    import json

    from lowmem.planner import plan
    from lowmem.recipe import load_recipe

    summary = json.loads((out / "summary.json").read_text())
    planned = plan(load_recipe(recipe, ["train.steps=3"]), "cpu", suggest=False).peak_bytes / 2**30
    assert abs(summary["predicted_peak_gb"] - planned) < 20 / 1024, (summary["predicted_peak_gb"], planned)
    assert summary["predicted_peak_gb"] <= summary["peak_rss_gb"]  # the step's peak; a run holds data and more
