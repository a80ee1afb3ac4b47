"""Step ``zo_noise`` of :mod:`gpu_proof` (issue #17): the Philox perturbation kernel on the device and
MeZO's step time per noise kind against one no-grad forward.

1. kernel: the kernel's Philox words against the PyTorch reference run on the same device (bit for
   bit), its normals (max abs difference), at the kernel-check sizes;
2. step: OPT-1.3B shape in fp16 at the issue's batch 4 x 128 (dry run: the tiny shapes), one no-grad
   forward and one MeZO step (lr 0) with ``noise=gaussian`` and ``noise=philox``, medians; the
   target is step <= 2.2x forward on a GPU. Also one perturbation pass (``+eps z`` over every
   parameter) in GB/s of the bytes it must move (read and write each parameter once).
"""

from __future__ import annotations

import torch
from gpu_proof_common import Shapes, _batch, free, host_model, median_time

KINDS = ("gaussian", "philox")


def _kernel_rows(s: Shapes) -> list[dict]:
    from lowmem.kernels import perturb as P
    from lowmem.kernels.perturb_triton import perturb_triton, philox_words_triton

    rows = []
    for n in s.kernel_sizes:
        seed, counters = 0x5EED + n, -(-n // 4)
        words = philox_words_triton(seed, counters, s.device)
        ref_words = torch.stack(P.philox4x32(seed, torch.arange(counters, device=s.device)))
        z = torch.empty(n, device=s.device)
        perturb_triton(z, seed, mode=0)
        err = (z - P.philox_normal(seed, 0, n, s.device)).abs().max().item()
        rows.append({"numel": n, "word_mismatch": int((words != ref_words).sum()), "normal_max_err": err,
                     "ok": bool((words == ref_words).all()) and err < 1e-4})
    return rows


def _step_rows(s: Shapes, tokens: tuple[int, int]) -> dict:
    from lowmem.optim import create_optimizer

    model = host_model(s.zo2_fit, torch.float16).to(s.device).eval()
    batch = _batch(s.zo2_fit, tokens, s.device)
    loss = lambda: model(**batch).loss  # noqa: E731
    with torch.no_grad():
        forward = median_time(loss, s.device, s.repeats)
    rows = {}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for kind in KINDS:
        opt = create_optimizer(model, "mezo", lr=0.0, eps=1e-3, noise=kind)
        step = median_time(lambda: opt.step(loss), s.device, s.repeats)
        seed = opt.draw_step_seed()
        with torch.no_grad():
            one_pass = median_time(lambda: opt._perturb(seed, 0, 0.0), s.device, s.repeats)
        rows[kind] = {"step_s": step, "step_over_forward": step / forward, "target_2_2x": step / forward <= 2.2,
                      "pass_ms": one_pass * 1e3, "pass_GBps": 2 * param_bytes / one_pass / 1e9}
        del opt
    del model, batch
    free(s.device)
    return {"forward_s": forward, "tokens": list(tokens), "params_GiB": param_bytes / 2**30, "rows": rows}


def zo_noise(s: Shapes) -> dict:
    kernel = _kernel_rows(s)
    tokens = (4, 128) if s.device == "cuda" else s.zo2_fit_tokens
    return {"kernel": kernel, "step": _step_rows(s, tokens), "ok": all(r["ok"] for r in kernel)}
