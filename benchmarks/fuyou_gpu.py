"""GPU part of the first-order offload benchmark (``python benchmarks/bench_fuyou.py --gpu``; needs a GPU).

Llama-3-8B shape (random init, bf16 compute), one GPU, same batch and sequence for every row:

* lowmem first-order offload engine (Fuyou) with AdamW and with APOLLO-Mini: fp32 masters and
  states in host RAM up to ``--host-gb``, the rest in files under ``--nvme-dir``;
* DeepSpeed ZeRO-Infinity (ZeRO-3; parameters and optimizer offloaded to ``--ds-offload``
  = cpu or nvme; DeepSpeedCPUAdam, torch-style AdamW; the model's own gradient checkpointing,
  as the engine recomputes each block), in a fresh process, with the code defaults of the
  pinned DeepSpeed version for everything not set here (ZeRO-Infinity: Rajbhandari et al., 2021,
  arXiv 2104.07857; config keys in DeepSpeed's ``runtime/zero/offload_config.py``).

Reported: peak GPU memory (``torch.cuda.max_memory_allocated``), tokens/s (median step after
``--warmup`` steps), the first losses (AdamW rows should agree within bf16 tolerance), and the
planner's predicted device peak and host RSS for the engine rows. Targets (issue 16): the 8B
AdamW engine run within 24 GB of GPU memory, and at least 2x ZeRO-Infinity's tokens/s.

``--dry-run`` rehearses the engine rows on the CPU with a tiny Llama shape (no DeepSpeed row, no
result file; the table is printed), so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256)
HP = dict(lr=1e-5, weight_decay=0.0)


def _shape(args) -> dict:
    return dict(TINY if args.dry_run else LLAMA3_8B, num_hidden_layers=args.layers)


def _config(args):
    from transformers import AutoConfig

    cfg = _shape(args)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _batch(args, vocab: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def _timed(step, args) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        _sync(args.device)
        t0 = time.perf_counter()
        losses.append(float(step()))
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    return times[args.warmup:], losses


def engine_run(args, optim: str) -> dict:
    from transformers import AutoModelForCausalLM

    from lowmem.offload.firstorder import FirstOrderEngine
    from lowmem.optim import create_optimizer

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    model = AutoModelForCausalLM.from_config(_config(args), dtype=torch.bfloat16 if cuda else torch.float32).train()
    opt = create_optimizer(model, optim, **HP)
    engine = FirstOrderEngine(model, opt, dict(nvme_dir=args.nvme_dir, host_memory_budget_gb=args.host_gb,
                                               prefetch_depth=args.prefetch), device=args.device)
    batch = _batch(args, model.config.vocab_size, args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = _timed(lambda: engine.step(lambda: model(**batch, use_cache=False).loss)[0], args)
    out = {"peak_gpu": torch.cuda.max_memory_allocated() if cuda else 0, "step_s": statistics.median(times),
           "losses": losses, "offloaded_embeddings": len(engine.big_params), "swapped_inputs": engine.driver.swap}
    engine.close()
    return out


def ds_config(args) -> dict:
    nvme = args.ds_offload == "nvme"
    offload = {"device": args.ds_offload, "pin_memory": True, **({"nvme_path": args.nvme_dir} if nvme else {})}
    return {
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": HP["lr"], "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": HP["weight_decay"]}},
        "zero_optimization": {"stage": 3, "offload_param": {**offload, "buffer_count": 5},
                              "offload_optimizer": {**offload, "buffer_count": 4},
                              "sub_group_size": int(1e9), "overlap_comm": True, "contiguous_gradients": True},
        **({"aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                    "overlap_events": True}} if nvme else {}),
    }


def deepspeed_run(args) -> dict:
    """ZeRO-Infinity in this (fresh) process: model partitioned at construction by zero.Init."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29533").items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed()
    config = ds_config(args)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = AutoModelForCausalLM.from_config(_config(args), dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batch = _batch(args, model.config.vocab_size, "cuda")

    def step():
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return loss

    torch.cuda.reset_peak_memory_stats()
    times, losses = _timed(step, args)
    return {"peak_gpu": torch.cuda.max_memory_allocated(), "step_s": statistics.median(times), "losses": losses,
            "deepspeed": deepspeed.__version__}


def _fresh(args, what: str) -> dict:
    from _common import run_json  # as main's: the children never import the report helpers

    cmd = [sys.executable, __file__, "--child", what, *args.argv]
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        return run_json(cmd, cwd=here, env=env)
    except RuntimeError as err:  # the report says which part failed and goes on
        return {"error": str(err).strip().splitlines()[-1]}


def _predicted(args, optim: str) -> tuple[float, float]:
    from lowmem.planner import plan
    from lowmem.recipe import recipe_from_dict

    tree = {"model": {"config": _shape(args), "tokenizer": "bytes",
                      "dtype": "bfloat16"},
            "data": {"path": "unused"}, "optim": {"name": optim, "max_grad_norm": None, **HP},
            "train": {"steps": 1, "batch_size": args.batch, "seq_len": args.seq},
            "offload": {"enabled": True, "nvme_dir": args.nvme_dir, "host_memory_budget_gb": args.host_gb,
                        "prefetch_depth": args.prefetch},
            "output": {"dir": "unused"}}
    p = plan(recipe_from_dict(tree), "cuda")
    return p.peak_bytes / 2**30, p.host_rss_bytes / 2**30


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--nvme-dir", default="/tmp/lowmem-fuyou")
    parser.add_argument("--host-gb", type=float, default=64.0)
    parser.add_argument("--ds-offload", choices=("cpu", "nvme"), default="cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optims", nargs="+", default=["adamw", "apollo_mini"])
    parser.add_argument("--dry-run", action="store_true", help="engine rows on the CPU, tiny shape, no DeepSpeed")
    args, _ = parser.parse_known_args(argv)
    args.argv = [a for a in argv if a != "--gpu"]
    args.device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.host_gb = 1e-4  # a block on the host, the rest through the NVMe tier
        args.layers, args.batch, args.seq, args.warmup, args.steps = 3, 1, 32, 1, 1
    if args.child:
        result = deepspeed_run(args) if args.child == "deepspeed" else engine_run(args, args.child)
        print(json.dumps(result))
        return
    from _common import markdown_table, write_result

    results = {name: _fresh(args, name) for name in args.optims}
    results["deepspeed"] = {"error": "not run in the dry run"} if args.dry_run else _fresh(args, "deepspeed")
    base = results["deepspeed"]
    tokens = args.batch * args.seq
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", r["error"][:120]])
            continue
        pred = _predicted(args, name) if name != "deepspeed" else None
        speed = tokens / r["step_s"]
        ratio = f"{base['step_s'] / r['step_s']:.2f}x" if "step_s" in base else "-"
        name = f"{name} ({r['offloaded_embeddings']} embedding params placed as blocks)" if pred else name
        rows.append([name if name != "deepspeed" else f"ZeRO-Infinity ({args.ds_offload}, DS {r['deepspeed']})",
                     f"{r['peak_gpu'] / 2**30:.2f}", "-" if pred is None else f"{pred[0]:.2f} / {pred[1]:.1f}",
                     f"{speed:.0f}", ratio, " ".join(f"{x:.3f}" for x in r["losses"][:3])])
    table = markdown_table(["run", "peak GPU (GiB)", "--plan GPU / host RSS (GiB)", "tokens/s",
                            "speed vs ZeRO-Infinity", "first losses"], rows)
    if args.dry_run:
        print(table)
        return
    write_result("fuyou_gpu", f"First-order offload vs ZeRO-Infinity: Llama-3-8B shape, batch {args.batch} x "
                              f"{args.seq}, bf16", table,
                 f"Engine: host budget {args.host_gb} GB, NVMe dir {args.nvme_dir}, prefetch {args.prefetch}. "
                 f"Medians of {args.steps} steps after {args.warmup} warm-up steps; random init.")


if __name__ == "__main__":
    main(sys.argv[1:])
