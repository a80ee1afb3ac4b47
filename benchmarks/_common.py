"""Shared pieces of the benchmark scripts: the machine header, writing a result table, and running a
measurement in a fresh process (:func:`run_json`).

Each benchmark writes its table to ``benchmarks/results/<name>.md``;
``benchmarks/run_all.py`` runs them all and assembles ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def command_line() -> str:
    """The exact command this script runs as, its path relative to the working directory, quoted for a shell."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_result(name: str, title: str, table: str, notes: str = "") -> Path:
    """Write one result section with the machine, the date and the exact command on top."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = (f"## {title}\n\n"
            f"- machine: {machine()}\n"
            f"- date: {datetime.date.today().isoformat()}\n"
            f"- command: `{command_line()}`\n\n"
            f"{table.strip()}\n")
    if notes:
        text += f"\n{notes.strip()}\n"
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    print(text)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_json(cmd: list[str], **kwargs) -> dict:
    """Run ``cmd`` in a fresh process (its RSS and CUDA peaks are its own) and return the JSON object its
    last line of output holds; a failed process raises RuntimeError with the end of its stderr.
    ``kwargs`` go to :func:`subprocess.run` (``cwd``, ``env``)."""
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
