"""The host's predicted peak RSS per phase (build, step, eval, save): printed by --plan; a run predicted not to
fit the RAM available (psutil) is refused in one line before anything is built, unless --force."""

import collections

import pytest

import lowmem.planner.phases as phases
from lowmem.cli import main


@pytest.fixture
def little_ram(monkeypatch):
    """psutil reports 64 KiB available of 128 KiB: every run is predicted not to fit."""
    vm = collections.namedtuple("vm", "available total")(2**16, 2**17)
    monkeypatch.setattr(phases.psutil, "virtual_memory", lambda: vm)


@pytest.mark.parametrize("offload", [False, True])
def test_a_run_that_does_not_fit_the_host_is_refused_unless_forced(tiny_recipe, tmp_path, capsys, little_ram,
                                                                    offload):
    sections = {"offload": {"enabled": True, "nvme_dir": str(tmp_path / "nvme")},
                "optim": {"name": "adamw", "lr": 1e-3, "max_grad_norm": None}} if offload else {}
    recipe = tiny_recipe(train={"steps": 1, "checkpoint_every": 0, "eval_batches": 1}, **sections)
    assert main([recipe, "--plan", "--quiet"]) == 0  # the plan prints every phase and is not refused
    line = next(x for x in capsys.readouterr().out.splitlines() if "host peak RSS by phase" in x)
    assert all(f"{p} " in line for p in phases.PHASES)
    assert main([recipe, "--quiet"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lowmem-train: ")]
    assert len(err) == 1 and "host memory: predicted peak RSS" in err[0], err
    assert "0.00 GiB available (of 0.00 GiB RAM)" in err[0] and err[0].endswith("pass --force to run anyway")
    assert not (tmp_path / "run").exists()  # refused before anything was built
    assert main([recipe, "--quiet", "--force"]) == 0
    assert (tmp_path / "run" / "summary.json").exists()
