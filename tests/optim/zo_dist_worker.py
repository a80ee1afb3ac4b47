"""One replica of distributed MeZO, for ``torchrun --nproc_per_node N`` (driven by test_zo_distributed.py).

Usage: zo_dist_worker.py OUT_DIR STEPS N_SAMPLES ONE_BYTE(0|1)
Writes OUT_DIR/rank<r>.pt: final parameters, the (step seed, [g]) log and the bytes exchanged.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

from lowmem.optim.mezo import MeZO


def make_model() -> nn.Module:
    torch.manual_seed(0)  # identical initial replicas
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def main(out_dir: str, steps: int, n_samples: int, one_byte: bool) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    gen = torch.Generator().manual_seed(1000 + rank)  # each process its own data
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
    opt = MeZO(model.parameters(), lr=0.05, eps=1e-3, weight_decay=0.01, n_samples=n_samples, seed=123,
               one_byte=one_byte)
    log = []
    for _ in range(steps):
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
        log.append((opt.last_step_seed, opt.last_projected_grads))
    torch.save({"params": [p.detach() for p in model.parameters()], "log": log,
                "bytes_sent": opt.exchange.bytes_sent, "bytes_received": opt.exchange.bytes_received},
               f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # gloo can abort at exit otherwise
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
