"""GPU proof in one command (issue #18): every CUDA path checked and the headline figures measured.

Steps, in order of value; each is timed, and skipped with a line when less of the budget is left
than it needs (``ESTIMATE_S``); a failing step is recorded and the next one runs:

1. ``pytest_gpu``: ``pytest -m gpu`` on every test file that has ``gpu`` tests;
2. ``kernels``: the Triton kernels (quantize, dequantize, fused 8-bit Adam step) compiled for the
   device against their PyTorch references, at odd sizes and on one tensor of more than 2**31
   elements (int32 offset overflow: mismatches beyond element 2**31 are counted apart);
3. ``adamw8bit``: one 8-bit AdamW step on 1B bf16 parameters against bitsandbytes' ``AdamW8bit``
   and torch's fused AdamW, and the fraction of the measured device copy bandwidth;
4. ``llama_step``: one Llama-3-8B-shape step (bf16, batch 1 x 1024, APOLLO-Mini, layer-wise,
   checkpointing): ``torch.cuda.max_memory_allocated`` against the planner (target <= 20 GB, 10%);
5. ``zo2``: MeZO through ZO2 on an OPT-30B shape (blocks in host RAM): peak GPU memory
   (target <= 8 GB, 3 slots), step time against the PCIe bound (bytes moved / measured pinned
   host-to-device bandwidth, target <= 1.2x); one MeZO step of OPT-1.3B in memory and through ZO2
   (target <= 1.15x); OPT-1.3B through ZO2 with an fp16 and an int8 host copy (bytes moved per step,
   step time, issue #27);
6. ``zo_noise``: the Philox perturbation kernel against its reference on the device, and one MeZO
   step with ``noise=gaussian`` and ``noise=philox`` against one no-grad forward (OPT-1.3B shape,
   fp16, batch 4 x 128; target <= 2.2x, issue #17): :mod:`gpu_proof_zo`.
7. ``fuyou``: AdamW through the first-order offload engine on 2 blocks of the Llama-3-8B shape (fp32
   masters and states on the host, embeddings placed as the blocks): peak GPU memory against the
   planner, tokens/s (the full 8B comparison with ZeRO-Infinity: ``bench_fuyou.py --gpu``).
8. ``quantized``: the Llama-3-8B-shape step with int8 trainable weights (against the planner) and LoRA on a
   frozen NF4 base (issue 27): :mod:`gpu_proof_quant`.
9. ``fsdp2``: ``torchrun --nproc_per_node N -m lowmem.cli`` with ``train.distributed: fsdp2`` on every GPU
   against DDP and one process (per-rank peak CUDA memory, step time, losses equal; issue 26):
   :mod:`gpu_proof_fsdp`. Skipped with one line below 2 CUDA devices (and in the dry run).

Everything goes to ``OUT_DIR/gpu_proof.json`` (written after every step, so a cut run keeps what it
measured), ``OUT_DIR/gpu_proof.md`` (the RESULTS.md section with the measured columns: copy it to
``benchmarks/results/gpu_proof.md`` and run ``python benchmarks/run_all.py --no-run``) and
``OUT_DIR/pytest_gpu.log``. Models are built from configs with cheap initialisation; nothing is
downloaded.

On the GPU machine (its own CUDA torch, Triton, transformers; lowmem from the checkout through
PYTHONPATH, which maps ``lowmem.kernels``/``lowmem.offload`` by the links in ``lowmem/``; carry
``.whl``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
      && PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_proof.py $OUT --budget-s 480

With this workplace's device tool: ``run`` with ``carry: [".whl"]``, ``timeout_s: 600`` and the two
lines above as its command (``$OUT`` comes back: three files). ``.whl/`` must be in the root of the
checkout the session sends. Preparing ``.whl/`` here (once; ignored by git): ``bash benchmarks/gpu_wheels.sh`` (bitsandbytes,
DeepSpeed built without ops, pydantic and the other small pure-Python dependencies, ~47 MB).

Dry run (CPU, tiny shapes, every step executed; ``tests/test_gpu_proof.py`` runs it in CI)::

    python benchmarks/gpu_proof.py OUT_DIR --dry-run
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

STEPS = ["pytest_gpu", "kernels", "adamw8bit", "llama_step", "zo2", "zo_noise", "fuyou", "quantized", "fsdp2"]
ESTIMATE_S = {"pytest_gpu": 60, "kernels": 45, "adamw8bit": 30, "llama_step": 60, "zo2": 200, "zo_noise": 40,
              "fuyou": 90, "quantized": 150, "fsdp2": 180}


def gpu_test_files() -> list[str]:
    """Test files that hold ``gpu``-marked tests."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


def pytest_gpu(out_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", *gpu_test_files()]
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text, rc = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as err:
        text, rc = f"{err.stdout or ''}\ntimed out after {timeout:.0f} s", "timeout"
    (out_dir / "pytest_gpu.log").write_text(text if isinstance(text, str) else text.decode())
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text.splitlines()[-1]
                                                        if text.strip() else "")}
    return {"rc": rc, **counts, "ok": rc == 0}


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for name in ("triton", "transformers", "bitsandbytes", "deepspeed", "pydantic"):
        try:  # the installed version, without importing (DeepSpeed's import alone takes seconds)
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "missing"
    return env


class Proof:
    """Runs the steps within the budget and writes the report after each one."""

    def __init__(self, out_dir: Path, budget_s: float, dry_run: bool):
        self.out_dir, self.budget_s, self.dry_run = out_dir, budget_s, dry_run
        self.started = time.perf_counter()
        self.report = {"dry_run": dry_run, "budget_s": budget_s, "environment": environment(), "steps": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def run(self, name: str, fn) -> None:
        need = 0 if self.dry_run else ESTIMATE_S[name]
        if self.left() < need:
            line = f"skipped: {self.left():.0f} s of the budget left, the step needs about {need} s"
            self.record(name, {"status": "skipped", "reason": line})
            return
        started = time.perf_counter()
        try:
            figures = fn()
            if "not_run" in figures:  # the step found nothing to run on (one line: why)
                self.record(name, {"status": "skipped", "reason": figures["not_run"]})
                return
            status = "ok" if figures.get("ok", True) else "failed"
            entry = {"status": status, **figures}
        except Exception as err:  # noqa: BLE001 -- one step failing must not stop the others
            entry = {"status": "error", "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = time.perf_counter() - started
        self.record(name, entry)

    def record(self, name: str, entry: dict) -> None:
        self.report["steps"][name] = entry
        print(f"[gpu_proof] {name}: {entry['status']} ({entry.get('seconds', 0):.1f} s)"
              + (f" -- {entry.get('reason') or entry.get('error')}" if entry["status"] in ("skipped", "error") else ""),
              flush=True)
        self.report["total_s"] = time.perf_counter() - self.started
        (self.out_dir / "gpu_proof.json").write_text(json.dumps(self.report, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu_proof.json, gpu_proof.md, pytest_gpu.log")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, every step executed")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole proof")
    parser.add_argument("--only", nargs="*", choices=STEPS, default=STEPS, help="run only these steps")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run for the CPU rehearsal")
    if args.dry_run and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined: the interpreter on CPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gpu_proof_steps as steps
    import gpu_proof_zo
    import gpu_proof_quant
    import gpu_proof_zo2
    import gpu_proof_fsdp
    from gpu_proof_common import Shapes
    from gpu_proof_report import write_markdown

    args.out_dir.mkdir(parents=True, exist_ok=True)
    shapes = Shapes.dry() if args.dry_run else Shapes.gpu()
    proof = Proof(args.out_dir, args.budget_s, args.dry_run)
    calls = {"pytest_gpu": lambda: pytest_gpu(args.out_dir, max(proof.left() - 300, 60) if not args.dry_run
                                              else max(proof.left(), 1)),
             "kernels": lambda: steps.kernels(shapes), "adamw8bit": lambda: steps.adamw8bit(shapes),
             "llama_step": lambda: steps.llama_step(shapes), "zo2": lambda: gpu_proof_zo2.zo2(shapes),
             "zo_noise": lambda: gpu_proof_zo.zo_noise(shapes),
             "fuyou": lambda: steps.fuyou(shapes), "quantized": lambda: gpu_proof_quant.quantized(shapes),
             "fsdp2": lambda: gpu_proof_fsdp.fsdp2(shapes, args.out_dir, max(proof.left(), 60))}
    for name in STEPS:
        if name in args.only:
            proof.run(name, calls[name])
    write_markdown(proof.report, args.out_dir / "gpu_proof.md")
    bad = [n for n, e in proof.report["steps"].items() if e["status"] in ("error", "failed")]
    print(f"[gpu_proof] done in {proof.report['total_s']:.0f} s; " + (f"not ok: {', '.join(bad)}" if bad else "all ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
