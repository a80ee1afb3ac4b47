"""Atomic, checksummed checkpoints (safetensors + JSON, no pickle) and exact resume.

A checkpoint is the directory ``run_dir/checkpoints/step-XXXXXXXX`` holding

* ``model.safetensors``     -- trainable parameters by name (tied weights once);
* ``optimizer.safetensors`` -- optimizer tensors (:func:`lowmem.state_encoding.optimizer_state_to_tensors`);
* ``rng.safetensors``       -- torch CPU/CUDA RNG states, numpy's key, every rank's private
  generators (``rank{r}.generator.{name}``);
* ``trainer.json``          -- step, ``extra``, optimizer meta, scheduler state, rest of the RNG states;
* ``manifest.json``         -- sha256 and size of every other file, written last;
* ``sharded/``              -- under FSDP2 only (:mod:`lowmem.fsdp_checkpoint`): the sharded weights and
  optimizer state that every rank wrote through ``torch.distributed.checkpoint``, listed in the
  manifest file by file; ``model.safetensors`` and ``optimizer.safetensors`` are then empty.

Crash safety (issue #2): everything is written into ``.tmp-step-...`` beside the final
directory, every file is fsynced, then the directory, then it is renamed to its final
name and the parent is fsynced. A kill at any moment leaves the previous checkpoints
intact; older checkpoints are removed only after the new one is complete (rename to a
temp name first, so a half-deleted one is never taken for complete). Temp directories
left by a kill are removed by the next save. One writer per run directory is assumed.

Private generators are per process (WTA-CRS under DDP: each rank seeds its own sampler; one
process is world size 1): the writer (rank 0) is given every rank's state,
``generator_states={name: [state of rank 0, 1, ...]}`` (the trainer all-gathers them), and
``trainer.json`` records the number of processes; on load each rank takes its own. A resume on
another number of processes is refused with a one-line error: the ranks' sample streams cannot
be re-dealt exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowmem.safetensors_stream import LazyTensors, Part, write_file
from lowmem.state_encoding import (CheckpointError, decode, encode, optimizer_state_from_tensors,
                                   optimizer_state_to_tensors)

FORMAT = 1
MANIFEST = "manifest.json"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
FILES = (*TENSOR_FILES, "trainer.json")
SHARDED = "sharded"  # the torch.distributed.checkpoint directory of an FSDP2 run
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
def _error(path: Path | str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}".replace("\n", " "))




# ---------------------------------------------------------------- RNG states
def _rng_state(generator_states: dict[str, list[torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s
    if any(not isinstance(states, (list, tuple)) for states in generator_states.values()):
        raise CheckpointError("generator_states: give each generator's get_state() of every process, in a list")
    counts = {len(states) for states in generator_states.values()}
    if len(counts) > 1 or 0 in counts:
        raise CheckpointError(f"generator_states: every generator needs one state per process, got {sorted(counts)}")
    for name, states in generator_states.items():
        for rank, state in enumerate(states):
            tensors[f"rank{rank}.generator.{name}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # uint32 keys travel bit-exactly as int32 (safetensors/torch have no full uint32 support)
    tensors["numpy.keys"] = torch.from_numpy(keys.astype(np.uint32).view(np.int32).copy())
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": encode(random.getstate(), "python", None)}
    if generator_states:
        meta["processes"] = counts.pop()
    return tensors, meta


def _set_generators(tensors: dict[str, torch.Tensor], prefix: str, generators: dict[str, torch.Generator],
                    where: Path) -> None:
    missing = [n for n in generators if prefix + n not in tensors]
    if missing:
        raise _error(where, f"no state for generator {missing[0]!r} (saved: "
                            f"{sorted(k[len(prefix):] for k in tensors if k.startswith(prefix))})")
    for name, gen in generators.items():
        gen.set_state(tensors[prefix + name])


def _check_world_size(meta: dict, world_size: int, where: Path) -> None:
    """Refuse to resume private generator states on another number of processes than saved them."""
    saved = meta.get("processes")  # None: no generator saved (a missing one is named on load)
    if saved is not None and saved != world_size:
        raise _error(where, f"private generator states (e.g. WTA-CRS sampling) were saved by {saved} processes, "
                            f"this run has {world_size}: resume with {saved} processes to continue exactly")


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator],
                   rank: int, where: Path) -> None:
    _set_generators(tensors, f"rank{rank}.generator.", generators, where)
    torch.set_rng_state(tensors["torch.cpu"])
    if torch.cuda.is_available():  # a GPU checkpoint resumed on CPU keeps only the CPU states
        for i in range(min(torch.cuda.device_count(), sum(k.startswith("torch.cuda.") for k in tensors))):
            torch.cuda.set_rng_state(tensors[f"torch.cuda.{i}"], i)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().view(np.uint32), pos, has_gauss, gauss))
    random.setstate(decode(meta["python"], {}))


# ---------------------------------------------------------------- durable files
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses views and shared storage: copy only the tensors that need it."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    save_file(out, str(path))


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _remove(path: Path) -> None:
    """Rename to a temp name first, so a kill mid-delete never leaves a 'complete' half."""
    trash = path.with_name(f"{_TMP_PREFIX}del-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def _complete_steps(ckpt_root: Path) -> list[tuple[int, Path]]:
    found = []
    for d in ckpt_root.iterdir() if ckpt_root.is_dir() else ():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir():
            try:
                manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(manifest, dict) and manifest.get("format") == FORMAT \
                    and isinstance(manifest.get("files"), dict):
                found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (manifest present and parses) under ``run_dir/checkpoints``."""
    steps = _complete_steps(Path(run_dir) / "checkpoints")
    return steps[-1][1] if steps else None


def checkpoint_step(path: str | Path) -> int:
    """The step of the checkpoint directory ``path`` (``.../step-00000030`` -> 30)."""
    return int(_STEP_DIR.match(Path(path).name).group(1))


# ---------------------------------------------------------------- save
def _write_files(tmp: Path, step: int, weights: dict[str, torch.Tensor] | list[Part], optimizer: torch.optim.Optimizer | None,
                 scheduler, generator_states: dict[str, list[torch.Tensor]], extra: dict | None,
                 optimizer_parts: Callable[[dict], list[Part]] | None = None) -> None:
    opt_tensors, opt_meta = ({}, None) if optimizer is None else optimizer_state_to_tensors(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_state(generator_states)
    trainer = {"step": step, "extra": encode(extra or {}, "extra", None), "optimizer": opt_meta,
               "scheduler": None if scheduler is None else encode(scheduler.state_dict(), "scheduler", None),
               "rng": rng_meta}
    if isinstance(weights, dict):
        _save_tensors(weights, tmp / "model.safetensors")
    else:  # parts (an offload engine's blocks), each read when written
        write_file(tmp / "model.safetensors", weights)
    if optimizer_parts is None:
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    else:  # an offload engine's: its blocks' state read one block at a time when written
        write_file(tmp / "optimizer.safetensors", optimizer_parts(opt_tensors))
    _save_tensors(rng_tensors, tmp / "rng.safetensors")
    _write_json(trainer, tmp / "trainer.json")
    files = {}
    sharded = sorted(str(f.relative_to(tmp)) for f in (tmp / SHARDED).rglob("*") if f.is_file())
    for name in (*FILES, *sharded):
        _fsync_path(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    _write_json({"format": FORMAT, "step": step, "files": files}, tmp / MANIFEST)
    _fsync_path(tmp / MANIFEST)
    _fsync_path(tmp)


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a checkpoint stores: trainable ones, tied weights once."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer, scheduler=None,
                    generator_states: dict[str, list[torch.Tensor]] | None = None, extra: dict | None = None,
                    keep_last: int = 2, weights: dict[str, torch.Tensor] | list[Part] | None = None,
                    sharded: Path | None = None,
                    optimizer_parts: Callable[[dict], list[Part]] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-{step:08d}`` atomically; keep the newest ``keep_last``.

    The weights are ``model``'s trainable parameters, or ``weights`` when the model's
    parameters live elsewhere (the offload engines' blocks: a list of
    :class:`~lowmem.safetensors_stream.Part`, each read from the tiers when written). ``generator_states`` maps a private
    generator's name to the ``get_state()`` of every process, in rank order (one process: a
    list of one). ``sharded``: a directory every rank wrote (FSDP2, :mod:`lowmem.fsdp_checkpoint`) with
    the weights and optimizer state, moved in as ``sharded/``; ``optimizer`` is then not written.
    ``optimizer_parts(tensors)``: the encoded optimizer tensors as parts (an offload engine's state)."""
    if (model is None) == (weights is None):
        raise ValueError("save_checkpoint: give exactly one of model and weights")
    weights = trainable_weights(model) if weights is None else weights
    if keep_last < 1:
        raise CheckpointError(f"{run_dir}: keep_last must be >= 1, got {keep_last}")
    if extra and "step" in extra:
        raise CheckpointError(f"{run_dir}: extra must not have a 'step' key (the step is stored on its own)")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for d in root.glob(f"{_TMP_PREFIX}*"):  # left by a kill; one writer per run_dir
        if sharded is None or d != Path(sharded):
            shutil.rmtree(d, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        if sharded is not None:
            os.rename(sharded, tmp / SHARDED)
        _write_files(tmp, step, weights, None if sharded is not None else optimizer, scheduler,
                     generator_states or {}, extra, optimizer_parts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # same step saved again (e.g. a rerun): swap in the new one
        _remove(final)
    os.rename(tmp, final)
    _fsync_path(root)
    for _, old in _complete_steps(root)[:-keep_last]:
        _remove(old)
    return final


# ---------------------------------------------------------------- load
def _verify(path: Path) -> dict:
    """Check the manifest and every file's size and sha256; return the manifest."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        missing = [n for n in FILES if n not in files]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _error(mpath, f"missing or unreadable checkpoint manifest ({type(err).__name__})") from None
    if missing:
        raise _error(mpath, f"manifest lists no {missing[0]}")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise _error(f, "checkpoint file is missing")
        size, want = f.stat().st_size, info.get("bytes") if isinstance(info, dict) else None
        if size != want:
            raise _error(f, f"checkpoint file is truncated or altered ({size} bytes, manifest says {want})")
        if _sha256(f) != info.get("sha256"):
            raise _error(f, "checkpoint file is corrupted (sha256 does not match the manifest)")
    return manifest


def _load_model(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name in sorted(set(params) ^ set(tensors)):
        side = "missing from the checkpoint" if name in params else "not a trainable parameter of the model"
        raise _error(where, f"parameter {name!r} is {side}")
    for name, p in params.items():
        if p.shape != tensors[name].shape:
            raise _error(where, f"parameter {name!r} has shape {tuple(tensors[name].shape)}, "
                                f"model has {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, where: Path) -> None:
    """``optimizer.load_state_dict(state_dict)``, keeping the saved dtypes of its state tensors."""
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError) as err:
        raise _error(where, f"optimizer does not match the checkpoint ({err})") from None
    # torch casts floating state to the param dtype (and would turn 8-bit codes into floats);
    # an exact resume keeps the saved dtypes.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, saved in state_dict["state"].items():
        live = optimizer.state[params[idx]]
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and live[key].dtype != value.dtype:
                live[key] = value.to(live[key].device)


def _read(path: Path, lazy: tuple[str, ...]) -> tuple[Mapping, Mapping, dict, dict]:
    """The checkpoint's tensors and ``trainer.json``; the files named in ``lazy`` as mappings that read each
    tensor from the file when asked for (an offload engine loads them one block at a time)."""
    loaded = {}
    for name in TENSOR_FILES:
        try:
            lazy_file = name in lazy
            loaded[name] = LazyTensors(path / name) if lazy_file else load_file(str(path / name))
        except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
            raise _error(path / name, f"unreadable safetensors file ({err})") from None
    try:
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise _error(path / "trainer.json", f"unreadable JSON ({err})") from None
    return loaded["model.safetensors"], loaded["optimizer.safetensors"], loaded["rng.safetensors"], trainer


def load_checkpoint(path: str | Path, *, model: nn.Module | None = None, optimizer: torch.optim.Optimizer,
                    scheduler=None, generators: dict[str, torch.Generator] | None = None,
                    load_weights: Callable[[dict[str, torch.Tensor]], None] | None = None,
                    rank: int = 0, world_size: int = 1,
                    load_optimizer: Callable[[Mapping, dict, Path], None] | None = None) -> dict:
    """Verify every checksum, then restore weights (into ``model``, or by calling
    ``load_weights``, given a mapping that reads each tensor when asked for), optimizer, scheduler, RNG states and this process's ``generators``
    (rank ``rank`` of ``world_size``, which must be the saved number of processes) in place;
    ``load_optimizer(tensors, meta, where)``: loads the optimizer's state instead, from the file read lazily;
    return ``{"step": step, **extra}``."""
    if (model is None) == (load_weights is None):
        raise ValueError("load_checkpoint: give exactly one of model and load_weights")
    path = Path(path)
    _verify(path)
    lazy = ("model.safetensors",) * (load_weights is not None) + ("optimizer.safetensors",) * (load_optimizer is not None)
    weights, opt_tensors, rng_tensors, trainer = _read(path, lazy)
    rng_file = path / "rng.safetensors"  # a refused world size is found before anything is restored
    if generators:
        _check_world_size(trainer["rng"], world_size, rng_file)
    if model is not None:
        _load_model(model, weights, path / "model.safetensors")
    else:
        load_weights(weights)
    if trainer["optimizer"] is not None:  # None: in sharded/ (FSDP2), read by lowmem.fsdp_checkpoint
        where = path / "optimizer.safetensors"
        if load_optimizer is not None:
            load_optimizer(opt_tensors, trainer["optimizer"], where)
        else:
            load_optimizer_state(optimizer, optimizer_state_from_tensors(opt_tensors, trainer["optimizer"]), where)
    if scheduler is not None:
        if trainer["scheduler"] is None:
            raise _error(path / "trainer.json", "checkpoint has no scheduler state")
        scheduler.load_state_dict(decode(trainer["scheduler"], {}))
    _set_rng_state(rng_tensors, trainer["rng"], generators or {}, rank, rng_file)
    return {"step": trainer["step"], **decode(trainer["extra"], {})}
