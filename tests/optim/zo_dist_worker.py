"""One replica of distributed MeZO, for ``torchrun --nproc_per_node N`` (driven by test_zo_distributed.py).

Usage: zo_dist_worker.py OUT_DIR STEPS N_SAMPLES ONE_BYTE(0|1) NOISE [LEAVE_AT]
Writes OUT_DIR/rank<r>.pt: final parameters, the (step seed, [g]) log and the bytes exchanged.
With LEAVE_AT, the last rank stops after LEAVE_AT steps and the others go on without it.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

from lowmem.optim.mezo import MeZO


def make_model() -> nn.Module:
    torch.manual_seed(0)  # identical initial replicas
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def main(out_dir: str, steps: int, n_samples: int, one_byte: bool, noise: str, leave_at: int | None) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = make_model()
    gen = torch.Generator().manual_seed(1000 + rank)  # each process its own data
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
    opt = MeZO(model.parameters(), lr=0.05, eps=1e-3, weight_decay=0.01, n_samples=n_samples, seed=123,
               one_byte=one_byte, noise=noise)
    log = []
    for step in range(steps):
        if step == leave_at:  # every process takes part in forming the survivors' group
            survivors = dist.new_group(list(range(size - 1)))
            if rank == size - 1:
                break
            opt.set_process_group(survivors)
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
        log.append((opt.last_step_seed, opt.last_projected_grads))
    torch.save({"params": [p.detach() for p in model.parameters()], "log": log,
                "bytes_sent": opt.exchange.bytes_sent, "bytes_received": opt.exchange.bytes_received},
               f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # gloo can abort at exit otherwise
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5],
         int(sys.argv[6]) if len(sys.argv) > 6 else None)
