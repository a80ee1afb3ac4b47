#!/usr/bin/env bash
# Prepare the wheels that benchmarks/gpu_proof.py needs on the GPU machine, which has its own CUDA
# torch, Triton, transformers, accelerate, safetensors, numpy, psutil, pyyaml and tqdm but no network,
# no bitsandbytes, no DeepSpeed and no pydantic. Run once, here, from the repository root: the
# wheels go to .whl/ (ignored by git; ~47 MB of the 64 MiB a device call carries). On the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
#   PYTHONPATH=$PWD:/tmp/site python3 benchmarks/gpu_proof.py $OUT
# (the device tool's `run` with carry: [".whl"]). Versions: those this repository is tested with.
set -euo pipefail
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# binary wheels for the machine's Python 3.12 on x86-64
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DEST" bitsandbytes==0.50.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing_extensions==4.16.0 hjson==3.1.0
# DeepSpeed ships as a source package: build a pure-Python wheel without its compiled ops (they are
# built just in time on first use, where the `deepspeed` tests need them)
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
du -sh "$DEST"
