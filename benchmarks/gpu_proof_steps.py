"""The measured steps of :mod:`gpu_proof` (issue #18) that run on one device: the kernels, 8-bit AdamW,
the Llama-3-8B step and the first-order offload. Each takes a :class:`~gpu_proof_common.Shapes` and
returns a dict of figures (JSON-ready); the ZO2 step is :mod:`gpu_proof_zo2`, ``zo_noise``
:mod:`gpu_proof_zo`.
"""

from __future__ import annotations

import os
import time

import torch
from gpu_proof_common import (Shapes, _batch, _recipe, copy_bandwidth, free, host_model, median_time, peak_since,
                              reset_peak)


# ---- Triton kernels against their references -----------------------------------------------------
def _compare_kernels(n: int, dtype: torch.dtype, device: str) -> dict:
    """Compiled (interpreted on CPU) kernels vs the PyTorch references, chunk by chunk of whole blocks
    (the reference's temporaries stay small even for a tensor of more than 2**31 elements)."""
    from lowmem.kernels.adamw8bit_step import AdamScalars, adam8bit_step_ref
    from lowmem.kernels.adamw8bit_step_triton import adam8bit_step_triton
    from lowmem.kernels.dynamic_map import dynamic_map
    from lowmem.kernels.quantize import block_chunks, dequantize_blockwise_ref, num_blocks, quantize_blockwise_ref
    from lowmem.kernels.quantize_triton import dequantize_blockwise_triton, quantize_blockwise_triton

    gen = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(n, generator=gen, device=device).to(dtype)
    code = dynamic_map(True, device)
    codes, absmax = quantize_blockwise_triton(x, code, 256)
    deq = dequantize_blockwise_triton(codes, absmax, code, 256, (n,))
    out = {"numel": n, "dtype": str(dtype).replace("torch.", ""), "code_mismatch": 0, "code_mismatch_above_2^31": 0,
           "absmax_equal": True, "dequant_max_err": 0.0}
    chunks = block_chunks(n, 256, 1 << 26)
    for el, bl in chunks:
        ref_codes, ref_absmax = quantize_blockwise_ref(x[el], code, 256)
        bad = int((codes[el] != ref_codes).sum())
        out["code_mismatch"] += bad
        out["code_mismatch_above_2^31"] += bad if el.start >= 2**31 else 0
        out["absmax_equal"] &= bool(torch.equal(absmax[bl], ref_absmax))
        ref = dequantize_blockwise_ref(codes[el], absmax[bl], code, 256, (el.stop - el.start,))
        out["dequant_max_err"] = max(out["dequant_max_err"], float((deq[el] - ref).abs().max()))
    del deq
    p, g = x, (torch.randn(n, generator=gen, device=device) * 1e-2).to(dtype)
    state = [torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(num_blocks(n, 256), device=device)] * 2
    state = [t.clone() for t in state]
    k = AdamScalars.of(1e-3, 0.9, 0.999, 1e-8, 1e-2, 1)
    p_ref_all = [(el, bl, p[el].clone()) for el, bl in chunks]
    adam8bit_step_triton(p, g, *state, k, 256)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    out["adam_p_close"], out["adam_code_off_by_more_than_1"] = True, 0
    for el, bl, p_ref in p_ref_all:
        ref_state = [torch.zeros(el.stop - el.start, dtype=torch.uint8, device=device),
                     torch.zeros(bl.stop - bl.start, device=device)] * 2
        ref_state = [t.clone() for t in ref_state]
        adam8bit_step_ref(p_ref, g[el], *ref_state, k, 256)
        out["adam_p_close"] &= bool(torch.allclose(p[el].float(), p_ref.float(), **tol))
        out["adam_code_off_by_more_than_1"] += int(((state[0][el].long() - ref_state[0].long()).abs() > 1).sum())
    # the interpreter's fp32 -> bf16 cast truncates where the compiled kernel rounds: on the CPU rehearsal
    # a bf16 parameter is reported, not judged
    judged = out["adam_p_close"] or (device == "cpu" and dtype == torch.bfloat16)
    out["ok"] = (out["code_mismatch"] <= 0.002 * n and out["code_mismatch_above_2^31"] == 0 and out["absmax_equal"]
                 and out["dequant_max_err"] == 0.0 and judged and out["adam_code_off_by_more_than_1"] <= 1e-3 * n)
    return out


def kernels(s: Shapes) -> dict:
    rows = [_compare_kernels(n, dt, s.device) for n in s.kernel_sizes for dt in (torch.float32, torch.bfloat16)]
    free(s.device)
    rows.append(_compare_kernels(s.big, torch.bfloat16, s.device))
    free(s.device)
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


# ---- 8-bit AdamW on 1B bf16 parameters -------------------------------------------------------------
def _optimizers(device: str) -> dict:
    from lowmem.optim.adamw8bit import AdamW8bit

    out = {"lowmem AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3, fp32_state_params=())}
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except ImportError as err:
        out["bitsandbytes AdamW8bit"] = err
    out["torch AdamW (fused)"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=device == "cuda")
    return out


def adamw8bit(s: Shapes) -> dict:
    """Step time of each optimizer on the same parameters; achieved bandwidth = bytes the step must
    move / time, against the measured device copy bandwidth."""
    copy_bw = copy_bandwidth(s.device, s.copy_bytes)
    out = {"copy_GBps": copy_bw / 1e9, "rows": {}}
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # on the CPU the optimizers take their PyTorch paths
    try:
        _time_optimizers(s, copy_bw, out)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    lw = out["rows"]["lowmem AdamW8bit"]
    for other in ("bitsandbytes AdamW8bit", "torch AdamW (fused)"):
        if "step_ms" in out["rows"][other] and "step_ms" in lw:
            out[f"lowmem_vs_{other.split()[0]}"] = lw["step_ms"] / out["rows"][other]["step_ms"]
    return out


def _time_optimizers(s: Shapes, copy_bw: float, out: dict) -> None:
    from lowmem.memory import state_bytes

    for name, make in _optimizers(s.device).items():
        if isinstance(make, Exception):
            out["rows"][name] = {"error": f"not installed ({make})"}
            continue
        gen = torch.Generator(device=s.device).manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(shape, generator=gen, device=s.device) * 0.02).to(torch.bfloat16))
                  for shape in s.adam_shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, device=s.device) * 1e-3).to(torch.bfloat16)
        try:
            opt = make(params)
            seconds = median_time(opt.step, s.device, s.repeats)
        except Exception as err:  # noqa: BLE001 -- one provider failing is a figure, not the end of the proof
            out["rows"][name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        n = sum(p.numel() for p in params)
        moved = 3 * 2 * n + 2 * state_bytes(opt)  # read p and g, write p; read and write the whole state
        out["rows"][name] = {"params": n, "step_ms": seconds * 1e3, "GBps": moved / seconds / 1e9,
                             "of_copy": moved / seconds / copy_bw}
        del opt, params
        free(s.device)


# ---- Llama-3-8B step: APOLLO-Mini, layer-wise, checkpointing vs the planner ------------------------
def llama_step(s: Shapes) -> dict:
    from lowmem.activations import apply_activations
    from lowmem.planner import model_config, plan
    from lowmem.planner import fake_model
    from lowmem.build import recipe_step, sample_batch

    recipe = _recipe(s.llama, s.llama_tokens, "bfloat16",
                     {"name": "apollo_mini", "layerwise": True, "max_grad_norm": None},
                     {"gradient_checkpointing": True})
    started = time.perf_counter()
    predicted = plan(recipe, "cuda", suggest=False)
    plan_s = time.perf_counter() - started
    base = reset_peak(s.device)
    with torch.device(s.device):
        model = fake_model(recipe.model, model_config(recipe.model))  # built on the device: cheap init
    apply_activations(model, recipe.activations, recipe.train.seed)
    stepper, _ = recipe_step(recipe, model, s.device)  # the trainer's step object, one process
    batch = sample_batch(recipe, model.config.vocab_size, s.device)
    step = median_time(lambda: stepper.step(lambda micro: batch), s.device, 1)
    measured = peak_since(base, s.device)
    del model, stepper
    free(s.device)
    out = {"predicted_GiB": predicted.peak_bytes / 2**30, "plan_s": plan_s, "step_s": step,
           "parts_GiB": {k: v / 2**30 for k, v in predicted.parts.items() if v}}
    if measured is not None:
        out.update(measured_GiB=measured / 2**30, planner_error=(predicted.peak_bytes - measured) / measured,
                   target_20GB=measured <= 20e9)
    return out


# ---- first-order offload (Fuyou): Llama-3-8B shape, AdamW, embeddings offloaded (auto rule) -------
def fuyou(s: Shapes) -> dict:
    """AdamW steps through :class:`FirstOrderEngine` on ``fuyou_layers`` blocks of the Llama shape (bf16
    compute, fp32 masters and states in host RAM; the embeddings, larger than a block, placed as the
    blocks): peak device memory against the planner, step time, tokens/s. The whole 8B run against
    ZeRO-Infinity is ``python benchmarks/bench_fuyou.py --gpu`` (fuyou_gpu.py)."""
    from lowmem.offload.firstorder import FirstOrderEngine
    from lowmem.optim import create_optimizer
    from lowmem.planner import plan

    config = dict(s.llama, num_hidden_layers=s.fuyou_layers)
    dtype = "bfloat16" if s.device == "cuda" else "float32"
    recipe = _recipe(config, s.llama_tokens, dtype, {"name": "adamw", "max_grad_norm": None, "lr": 1e-5}, {})
    predicted = plan(recipe.model_copy(update={"offload": recipe.offload.model_copy(
        update={"enabled": True, "prefetch_depth": 2})}), "cuda", suggest=False)
    model = host_model(config, getattr(torch, dtype)).train()
    engine = FirstOrderEngine(model, create_optimizer(model, "adamw", lr=1e-5), dict(prefetch_depth=2),
                              device=s.device)
    batch = _batch(config, s.llama_tokens, s.device)
    base = reset_peak(s.device)
    step = median_time(lambda: engine.step(lambda: model(**batch, use_cache=False).loss), s.device, 2)
    measured = peak_since(base, s.device)
    out = {"layers": s.fuyou_layers, "offloaded_embeddings": len(engine.big_params), "step_s": step,
           "tokens_per_s": s.llama_tokens[0] * s.llama_tokens[1] / step, "swap": engine.driver.swap,
           "predicted_GiB": predicted.peak_bytes / 2**30, "predicted_host_GiB": predicted.host_rss_bytes / 2**30}
    engine.close()
    del engine, model
    free(s.device)
    if measured is not None:
        out.update(measured_GiB=measured / 2**30, planner_error=(predicted.peak_bytes - measured) / measured)
    return out

