"""A run directory holds one run (issue 24, defects 3 and 4): a rerun is refused, ``--overwrite`` says what it
removes, ``--resume`` on a finished run changes nothing, ``--resume`` without a checkpoint is refused; Ctrl-C
(a real SIGINT) stops with one line naming the last checkpoint and the exact command that resumes it."""

import hashlib
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from lowmem.cli import main
from lowmem.trainer import rate


def _cli(capsys, *args, quiet=True):
    code = main([*args, "--quiet"] if quiet else list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _files(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def _one_line(err: str, prefix: str = "lowmem-train: ") -> str:
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_run_directory_is_never_mixed_or_clobbered(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(train={"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 2})
    run = tmp_path / "run"
    code, _, err = _cli(capsys, recipe, quiet=False)
    assert code == 0 and "eval: " in err and "tok_s=" in err  # the bar is up during the step-0 evaluation
    first = _files(run)
    assert {"metrics.jsonl", "summary.json", "checkpoints/step-00000003/manifest.json"} <= first.keys()

    code, _, err = _cli(capsys, recipe, "train.steps=2")  # a rerun without --resume
    line = _one_line(err)
    assert code == 2 and line.startswith("lowmem-train: error:")
    assert all(word in line for word in (str(run), "--resume", "--overwrite", "output.dir")), line
    assert _files(run) == first

    code, out, err = _cli(capsys, recipe, "--resume")  # finished: nothing to do, nothing touched
    assert code == 0 and out == "" and "already complete" in _one_line(err)
    assert _files(run) == first

    code, _, err = _cli(capsys, recipe, "--resume", "--overwrite")
    assert code == 2 and "give one of them" in _one_line(err) and _files(run) == first

    code, out, err = _cli(capsys, recipe, "train.steps=1", "--overwrite")  # said, and only the old run's files
    assert code == 0 and json.loads(out)["steps"] == 1
    assert "--overwrite: removed the previous run's metrics.jsonl, checkpoints, model, summary.json" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]  # no step 2, 3 of the old
    assert max(json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_without_a_checkpoint_is_refused(tiny_recipe, tmp_path, capsys):
    code, _, err = _cli(capsys, tiny_recipe(), "--resume")
    line = _one_line(err)
    assert code == 2 and "--resume: no complete checkpoint in" in line and str(tmp_path / "run") in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # it did not start over


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tiny_recipe, tmp_path):
    """A real SIGINT mid-run, then the printed command run as printed. Both runs are APOLLO-Mini on the CPU,
    so their stderr also shows that no foreign library speaks in a plain run (issue 24: bitsandbytes' kernel
    hub, DeepSpeed's accelerator line, transformers' FutureWarning, torch's pin_memory warning)."""
    recipe = tiny_recipe(optim={"name": "apollo_mini", "lr": 1e-3, "args": {"scale_front": True}},
                         model={"gradient_checkpointing": True},
                         train={"steps": 40, "checkpoint_every": 2, "keep_checkpoints": 1, "eval_batches": 1})
    cli = [sys.executable, "-m", "lowmem.cli"]
    proc = subprocess.Popen([*cli, recipe, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's
    # background job (CI) ignores SIGINT, and Python keeps an ignored SIGINT ignored
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("step-*/manifest.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    line = _one_line(err)
    step = int(line.split("last complete checkpoint: step ")[1].split()[0])
    assert step in range(2, 40, 2) and (tmp_path / "run" / "checkpoints" / f"step-{step:08d}").is_dir()
    command = line.split("continue with: ")[1]
    assert shlex.split(command) == ["lowmem-train", recipe, "--resume"]

    resumed = subprocess.run([*cli, *shlex.split(command)[1:], "--quiet"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from its checkpoint of step {step} " in _one_line(resumed.stderr)
    assert json.loads(resumed.stdout)["steps"] == 40
    for noise in ("kernels-community", "Setting accelerator", "FutureWarning", "pin_memory", "Warning"):
        assert noise not in err + resumed.stderr, noise


def test_the_bar_shows_tokens_per_second_below_one():
    assert [rate(x) for x in (0.0042, 0.42, 4.257, 42.57, 425.7, 2639.4)] == \
        ["0.0042", "0.42", "4.26", "42.6", "426", "2639"]
