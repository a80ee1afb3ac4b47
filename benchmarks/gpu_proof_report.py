"""The RESULTS.md section of :mod:`gpu_proof`: its report (``gpu_proof.json``) as markdown tables with
the measured columns, the machine, date and command on top (the format of ``_common.write_result``)."""

from __future__ import annotations

import datetime
from pathlib import Path

from _common import command_line, machine, markdown_table


def _f(value, fmt: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def _summary(steps: dict) -> str:
    rows = [[name, e["status"], _f(e.get("seconds"), ".1f"), (e.get("reason") or e.get("error") or "")[:160]]
            for name, e in steps.items()]
    return markdown_table(["step", "status", "seconds", "note"], rows)


def _kernels(e: dict) -> str:
    rows = [[f"{r['numel']:,}", r["dtype"], r["code_mismatch"], r["code_mismatch_above_2^31"], _f(r["absmax_equal"]),
             _f(r["dequant_max_err"], ".1e"), _f(r["adam_p_close"]), r["adam_code_off_by_more_than_1"], _f(r["ok"])]
            for r in e["rows"]]
    return markdown_table(["elements", "dtype", "code mismatches", "beyond 2^31", "absmax equal", "dequant max err",
                           "Adam p close", "Adam codes off > 1", "ok"], rows)


def _adamw(e: dict) -> str:
    rows = [[name, _f(r.get("params"), ","), _f(r.get("step_ms")), _f(r.get("GBps"), ".0f"), _f(r.get("of_copy"), ".0%")]
            if "error" not in r else [name, "-", "-", "-", r["error"][:80]] for name, r in e["rows"].items()]
    rows.append(["device copy", "-", "-", _f(e["copy_GBps"], ".0f"), "100%"])
    return markdown_table(["optimizer (bf16 params)", "params", "step ms (median)", "GB/s (bytes it must move)",
                           "of copy bandwidth"], rows)


def _llama(e: dict) -> str:
    row = [_f(e.get("measured_GiB")), _f(e["predicted_GiB"]), _f(e.get("planner_error"), "+.1%"),
           _f(e.get("target_20GB")), _f(e["step_s"])]
    return markdown_table(["measured peak GiB (max_memory_allocated)", "planner GiB", "planner error",
                           "<= 20 GB", "step s"], [row])


def _zo2(e: dict) -> str:
    b, f = e["opt30b"], e["fit"]
    big = markdown_table(["peak GPU GiB", "device slots", "peak / block", "step s (median)", "GiB moved/step",
                          "PCIe bound s", "step / bound", "<= 8 GB", "<= 1.2x", "pinned GiB", "close s"],
                         [[_f(b.get("peak_GiB")), b["device_slots"], _f(b.get("peak_over_block"), ".1f"),
                           _f(b["step_s"]), _f(b["GiB_moved_per_step"], ".1f"), _f(b["pcie_bound_s"]),
                           _f(b["step_over_bound"]), _f(b.get("target_peak_8GB")), _f(b.get("target_bound_1_2x")),
                           _f(b["pinned_GiB"], ".1f"), _f(b["close_s"], ".1f")]])
    fit = markdown_table(["MeZO in memory s", "MeZO through ZO2 s", "ratio", "<= 1.15x"],
                         [[_f(f["in_memory_s"], ".3f"), _f(f["zo2_s"], ".3f"), _f(f["ratio"]), _f(f["target_1_15x"])]])
    q = e["int8"]
    int8 = markdown_table(["host copy", "GiB moved/step", "step s (median)", "PCIe bound s", "first loss"],
                          [[h, _f(q[h]["GiB_moved_per_step"], ".3f"), _f(q[h]["step_s"], ".3f"),
                            _f(q[h]["pcie_bound_s"], ".3f"), _f(q[h]["first_loss"], ".4f")]
                           for h in ("float16", "int8")])
    return f"OPT-30B shape, fp16, batch 1 x 512, blocks in host RAM (H2D {e['h2d_GBps']:.1f} GB/s pinned):\n\n{big}\n\n" \
           f"A model that fits (OPT-1.3B shape, fp16, batch 4 x 512):\n\n{fit}\n\n" \
           f"The same model through ZO2 (batch 1 x 512), fp16 vs int8 host copy (offload.host_dtype): bytes " \
           f"x{q['bytes_ratio']:.3f}, step time x{q['time_ratio']:.2f}, first loss differs by " \
           f"{q['loss_rel_diff']:.2%}:\n\n{int8}"


def _zo_noise(e: dict) -> str:
    kernel = markdown_table(["elements", "Philox word mismatches", "normal max err", "ok"],
                            [[f"{r['numel']:,}", r["word_mismatch"], _f(r["normal_max_err"], ".1e"), _f(r["ok"])]
                             for r in e["kernel"]])
    st = e["step"]
    steps = markdown_table(["noise", "MeZO step s", "step / forward", "<= 2.2x", "one +eps z pass ms", "pass GB/s"],
                           [[k, _f(r["step_s"], ".4f"), _f(r["step_over_forward"]), _f(r["target_2_2x"]),
                             _f(r["pass_ms"]), _f(r["pass_GBps"], ".0f")] for k, r in st["rows"].items()])
    return f"{kernel}\n\nOPT-1.3B shape, fp16 ({st['params_GiB']:.2f} GiB of parameters), batch " \
           f"{st['tokens'][0]} x {st['tokens'][1]}, one no-grad forward {st['forward_s']:.4f} s:\n\n{steps}"


def _fuyou(e: dict) -> str:
    row = [e["layers"], e["offloaded_embeddings"], _f(e.get("measured_GiB")), _f(e["predicted_GiB"]),
           _f(e.get("planner_error"), "+.1%"), _f(e["predicted_host_GiB"], ".1f"), _f(e["step_s"]),
           _f(e["tokens_per_s"], ".0f"), e["swap"]]
    return markdown_table(["blocks", "offloaded embedding params", "measured peak GiB", "planner GiB",
                           "planner error", "planner host RSS GiB", "step s", "tokens/s", "swapped inputs"], [row])


def _quantized(e: dict) -> str:
    i8, nf4 = e["int8"], e["nf4_lora"]
    rows = [["int8 weights, APOLLO-Mini layer-wise", _f(i8["weights_GiB"]), _f(i8.get("measured_GiB")),
             _f(i8["predicted_GiB"]), _f(i8.get("planner_error"), "+.1%"), _f(i8["step_s"])],
            ["LoRA r16 on a frozen NF4 base, AdamW", _f(nf4["weights_GiB"]), _f(nf4.get("measured_GiB")), "-", "-",
             _f(nf4["step_s"])]]
    return markdown_table(["Llama-3-8B shape, 1 x 1024, checkpointing", "weights GiB", "measured peak GiB",
                           "planner GiB", "planner error", "step s"], rows)


def _fsdp2(e: dict) -> str:
    cuda = e["device"] == "cuda"
    rows = [[name, 1 if name == "one" else e["processes"], _f(r["peak_cuda_GiB" if cuda else "peak_rss_GiB"]),
             _f(r.get("predicted_GiB")), _f(r["parameter_MiB_per_rank"], ".0f"),
             _f(r["optimizer_state_MiB_per_rank"], ".0f"), _f(r["tokens_per_s"], ".0f"),
             "-" if name == "one" else _f(e[name]["rel_diff"], ".1e")] for name, r in e["runs"].items()]
    header = ["run", "processes", f"peak {'CUDA' if cuda else 'RSS'} GiB (rank 0)", "planned GiB", "params MiB/rank",
              "opt. state MiB/rank", "tokens/s (median)", "rel. diff vs one (grad norms, eval loss)"]
    return f"`{e['command']}`\n\n" + markdown_table(header, rows)


SECTIONS = {"kernels": ("Triton kernels vs PyTorch references", _kernels),
            "adamw8bit": ("8-bit AdamW step, 1B bf16 parameters", _adamw),
            "llama_step": ("Llama-3-8B shape, bf16, 1 x 1024, APOLLO-Mini layer-wise + checkpointing", _llama),
            "zo2": ("ZO2 offload", _zo2),
            "zo_noise": ("Zeroth-order step per noise kind (Philox kernel, issue #17)", _zo_noise),
            "fuyou": ("First-order offload (Fuyou), Llama-3-8B shape blocks, AdamW, bf16, 1 x 1024", _fuyou),
            "quantized": ("Quantized weights (issue 27), Llama-3-8B shape", _quantized),
            "fsdp2": ("FSDP2 against DDP and one process (issue 26), Llama 0.5B shape, fp32 AdamW", _fsdp2)}


def write_markdown(report: dict, path: Path) -> None:
    steps, env = report["steps"], report["environment"]
    kind = "dry run on the CPU (tiny shapes)" if report["dry_run"] else "GPU"
    text = [f"## GPU proof ({kind})\n", f"- machine: {machine()}", f"- date: {datetime.date.today().isoformat()}",
            f"- command: `{command_line()}`",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items()), "", _summary(steps)]
    if "pytest_gpu" in steps and steps["pytest_gpu"]["status"] != "skipped" and "rc" in steps["pytest_gpu"]:
        e = steps["pytest_gpu"]
        text += ["", f"`pytest -m gpu`: {e.get('passed', 0)} passed, {e.get('failed', 0)} failed, "
                     f"{e.get('skipped', 0)} skipped (rc {e['rc']}; log: pytest_gpu.log)."]
    for name, (title, fmt) in SECTIONS.items():
        if steps.get(name, {}).get("status") in ("ok", "failed"):
            text += ["", f"### {title}", "", fmt(steps[name])]
    path.write_text("\n".join(text) + "\n")
