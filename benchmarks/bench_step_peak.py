"""Host RSS of each phase of an offloaded run split into anonymous and file-backed pages, against the plan (issue 25).

A step-phase peak far above ``offload.host_memory_budget_gb`` + runtime could be page cache of files mapped
from NVMe (``RssFile``: reclaimable) or memory the process holds (``RssAnon``). Each case runs ``lowmem-train``
on a ``bench_largest.py`` recipe (bf16 Llama shape, batch 1 x 32, 2 steps, eval, save) in a fresh process
with a thread sampling ``/proc/self/status`` every 10 ms: per phase the largest VmRSS / RssAnon / RssFile
seen, beside the kernel's exact peak (``summary.json``'s ``peak_rss_by_phase_gb``, VmHWM) and the plan's
prediction (``lowmem-train RECIPE --plan``).

    python benchmarks/bench_step_peak.py [--cases fo_offload_nvme:0.5B,fo_offload_nvme:1B,zo2_nvme:1B@0.5]
                                         [--quick] [--workdir DIR]

A case is ``WAY:SHAPE`` (the 2 GiB budget of bench_largest) or ``WAY:SHAPE@BUDGET_GB``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, run_json, write_result  # noqa: E402
from bench_largest import recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _status() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 2**20 for k, v in (line.split(":", 1) for line in f) if k in FIELDS}


def child(path: str) -> None:
    """Run lowmem-train on ``path`` with the sampler; print {phase: {field: GiB}} last."""
    import lowmem.trainer as trainer
    from lowmem.cli import main

    where, peaks = ["other"], {}

    def sample():
        while True:
            now, top = _status(), peaks.setdefault(where[0], dict.fromkeys(FIELDS, 0.0))
            for k, v in now.items():
                top[k] = max(top[k], v)
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    phase = trainer.Trainer.phase

    @contextlib.contextmanager
    def tracked(self, name):
        before, where[0] = where[0], name
        try:
            with phase(self, name):
                yield
        finally:
            where[0] = before

    trainer.Trainer.phase = tracked
    code = main([path, "--quiet", "--overwrite"])
    print(json.dumps({"code": code, "phases": peaks}))


def run_case(case: str, workdir: str | None) -> dict:
    way, rest = case.split(":")
    shape, _, budget = rest.partition("@")
    work = Path(tempfile.mkdtemp(prefix=f"step-peak-{shape}-{way}-", dir=workdir))
    tree = recipe(shape, way, work, "bfloat16", 32)
    if budget:
        tree["offload"]["host_memory_budget_gb"] = float(budget)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    planned = subprocess.run([sys.executable, "-m", "lowmem.cli", str(path), "--plan"], capture_output=True,
                             text=True, env=env, cwd=ROOT).stdout
    plan = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) GiB", planned.split("host peak RSS by phase:")[-1])}
    out = run_json([sys.executable, __file__, "--child", str(path)], env=env, cwd=ROOT)
    hwm = json.loads((work / "run" / "summary.json").read_text())["peak_rss_by_phase_gb"]
    shutil.rmtree(work, ignore_errors=True)
    row = {"case": case, "plan": plan, "sampled": out["phases"], "vmhwm": hwm}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="fo_offload_nvme:0.5B,fo_offload_nvme:1B,zo2_nvme:1B@0.5")
    parser.add_argument("--quick", action="store_true", help="the first case only")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    cases = args.cases.split(",")[:1] if args.quick else args.cases.split(",")
    load = os.getloadavg()[0]
    rows = [run_case(c, args.workdir) for c in cases]
    table = markdown_table(
        ["case (way:shape@budget GiB)", "phase", "peak RSS, VmHWM (GiB)", "sampled VmRSS", "RssAnon", "RssFile",
         "planned (GiB)"],
        [[r["case"], p, r["vmhwm"].get(p, "-"), round(s["VmRSS"], 2), round(s["RssAnon"], 2), round(s["RssFile"], 2),
          r["plan"].get(p, "-")] for r in rows for p, s in r["sampled"].items() if p in r["vmhwm"]])
    notes = (f"Load average at the start: {load:.1f} (`uptime`). bf16 Llama shapes of bench_largest.py, batch 1 x 32, "
             "2 steps, 1 eval batch, model saved; budget 2 GiB unless `@`. Sampled: the largest value seen by a 10 ms "
             "sampler thread in the phase (RssAnon + RssFile + RssShmem = VmRSS); VmHWM: the kernel's exact peak.")
    write_result("step_peak", "Host RSS per phase, anonymous vs file pages, against the plan (bench_step_peak.py)",
                 table, notes)


if __name__ == "__main__":
    main()
