"""Step ``zo2`` of :mod:`gpu_proof` (issue #18): MeZO through ZO2 on an OPT-30B shape (blocks in host
RAM: peak device memory, step time against the PCIe bound), and one MeZO step of a model that fits,
in memory and through ZO2; the same model through ZO2 with an fp16 and an int8 host copy
(``offload.host_dtype: int8``, issue #27): bytes each step moves, step time against the PCIe bound.
"""

from __future__ import annotations

import time

import torch
from gpu_proof_common import (Shapes, Traffic, _batch, free, h2d_bandwidth, host_model, median_time, peak_since,
                              reset_peak)


def _zo2_engine(config: dict, device: str, host_dtype: str | None = None):
    from lowmem.offload.engine import ZO2Engine
    from lowmem.optim import create_optimizer

    model = host_model(config, torch.float16)
    return ZO2Engine(model, create_optimizer(model, "mezo", lr=1e-7, eps=1e-3), {"host_dtype": host_dtype},
                     device=device)


def engine_device_bytes(engine) -> int:
    """Device bytes the engine holds between steps: resident weights and buffers, slots, staging."""
    tensors = {t.data_ptr(): t for _, m in engine.driver.units for t in [*m.parameters(), *m.buffers()]}
    tensors.update({t.data_ptr(): t for t in engine.mover.slots + (engine.mover.staging or [])})
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device.type == "cuda")


def _zo2_big(s: Shapes, h2d: float) -> dict:
    started = time.perf_counter()
    engine = _zo2_engine(s.zo2_big, s.device)
    setup = time.perf_counter() - started
    base = reset_peak(s.device, held=engine_device_bytes(engine))
    step = median_time(lambda: engine.step(_batch(s.zo2_big, s.zo2_big_tokens)), s.device, s.zo2_repeats)
    peak = peak_since(base, s.device)
    item = engine.store.dtype.itemsize
    moved = 2 * sum(pk.numel for pk in engine.packed) * item
    block = max(pk.numel for pk in engine.packed) * item
    out = {"setup_s": setup, "step_s": step, "GiB_moved_per_step": moved / 2**30, "pcie_bound_s": moved / h2d,
           "step_over_bound": step / (moved / h2d), "block_GiB": block / 2**30, "device_slots": len(engine.mover.slots),
           "pinned_GiB": engine.store.memory.pinned_bytes / 2**30}
    started = time.perf_counter()
    engine.close()
    out["close_s"] = time.perf_counter() - started
    if peak is not None:
        out.update(peak_GiB=peak / 2**30, peak_over_block=peak / block, target_peak_8GB=peak <= 8e9,
                   target_bound_1_2x=out["step_over_bound"] <= 1.2)
    del engine
    free(s.device)
    return out


def _zo2_fit(s: Shapes) -> dict:
    from lowmem.optim import create_optimizer

    model = host_model(s.zo2_fit, torch.float16).to(s.device).eval()
    opt = create_optimizer(model, "mezo", lr=1e-7, eps=1e-3)
    batch = _batch(s.zo2_fit, s.zo2_fit_tokens, s.device)
    in_memory = median_time(lambda: opt.step(lambda: model(**batch).loss), s.device, s.repeats)
    del model, opt, batch
    free(s.device)
    engine = _zo2_engine(s.zo2_fit, s.device)
    through = median_time(lambda: engine.step(_batch(s.zo2_fit, s.zo2_fit_tokens)), s.device, s.repeats)
    engine.close()
    del engine
    free(s.device)
    return {"in_memory_s": in_memory, "zo2_s": through, "ratio": through / in_memory,
            "target_1_15x": through / in_memory <= 1.15}


def _zo2_int8(s: Shapes, h2d: float) -> dict:
    """The fit model through ZO2 (batch of the big run, blocks in host RAM) with an fp16 and an int8 host
    copy: bytes one step moves (counted at the store), median step time, the PCIe bound, the first loss
    (the int8 copy rounds the weights to nearest once, at load)."""
    out = {}
    for host in ("float16", "int8"):
        engine = _zo2_engine(s.zo2_fit, s.device, host)
        traffic = Traffic(engine)
        batch = _batch(s.zo2_fit, s.zo2_big_tokens)
        loss = float(engine.step(batch))
        moved = traffic.up + traffic.down
        step = median_time(lambda: engine.step(batch), s.device, s.repeats)
        out[host] = {"step_s": step, "GiB_moved_per_step": moved / 2**30, "pcie_bound_s": moved / h2d,
                     "first_loss": loss}
        engine.close()
        del engine
        free(s.device)
    fp16, int8 = out["float16"], out["int8"]
    return {**out, "bytes_ratio": int8["GiB_moved_per_step"] / fp16["GiB_moved_per_step"],
            "time_ratio": int8["step_s"] / fp16["step_s"],
            "loss_rel_diff": abs(int8["first_loss"] / fp16["first_loss"] - 1)}


def zo2(s: Shapes) -> dict:
    h2d = h2d_bandwidth(s.device, s.copy_bytes)
    return {"h2d_GBps": h2d / 1e9, "opt30b": _zo2_big(s, h2d), "fit": _zo2_fit(s), "int8": _zo2_int8(s, h2d)}
