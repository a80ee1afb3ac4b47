"""``lowmem-train --env`` / ``python -m lowmem.env`` (issue 24): every item of the bug-report environment is
named, fast, and the report comes out whole when optional packages are missing or a probe fails."""

import time
from importlib import metadata

import pytest

from lowmem import env

ITEMS = ["python", "platform", "CPU", "torch", "transformers", "accelerate", "bitsandbytes", "triton", "deepspeed",
         "peft", "lowmem", "torch build", "CUDA devices", "Triton kernels", "bitsandbytes backend",
         "DeepSpeed async I/O", "bf16 autocast on this CPU", "CPU threads"]


def test_cli_env_names_every_item_fast(capsys):
    import torch

    from lowmem.cli import main

    start = time.perf_counter()
    assert main(["--env"]) == 0
    assert time.perf_counter() - start < 5
    report = dict(line[2:].split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert [name for name in ITEMS if name not in report] == []
    assert report["torch"] == torch.__version__ and report["lowmem"] == metadata.version("lowmem")
    assert report["CUDA devices"] == "none" if not torch.cuda.is_available() else "GiB" in report["CUDA devices"]
    assert report["bf16 autocast on this CPU"].startswith(
        "native" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "not native")


def test_cli_without_recipe_or_env_is_a_usage_error():
    from lowmem.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_missing_optional_packages_and_a_failing_probe(monkeypatch):
    """bitsandbytes, Triton, DeepSpeed and peft uninstalled (their metadata and modules hidden), and the CUDA
    probe raising: each says so on its line; no exception."""
    import importlib.util

    absent = {"bitsandbytes", "triton", "deepspeed", "peft"}
    real_version, real_find_spec = metadata.version, importlib.util.find_spec

    def version(dist):
        if dist in absent:
            raise metadata.PackageNotFoundError(dist)
        return real_version(dist)

    def broken():
        raise RuntimeError("CUDA driver initialization failed\nmore")

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name, *a))
    monkeypatch.setattr(env, "cuda_devices", broken)
    report = dict(env.report())
    assert report["bitsandbytes"] == "not installed (pip install 'lowmem[gpu]')"
    assert report["deepspeed"] == "not installed (pip install 'lowmem[deepspeed]')"
    assert report["bitsandbytes backend"] == "not installed" and report["DeepSpeed async I/O"] == "DeepSpeed not installed"
    assert report["Triton kernels"].startswith("not installed")
    assert report["CUDA devices"] == "unknown (RuntimeError: CUDA driver initialization failed)"
