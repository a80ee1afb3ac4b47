"""Distributed zeroth-order training with shared randomness ("Just One Byte", Zelikman et al., 2023).

Every process holds a full replica. In step ``t`` all processes share the step
seed ``s_t`` (same private generator, same ``seed``). Process ``r`` of ``N``
evaluates its own ``n`` perturbations on its own batch, streams
``stream = r * n + j`` (``j < n``), giving scalars ``g_{r,j}``. The processes
exchange only those scalars (one ``all_gather`` of ``n`` numbers each) and every
process applies every update, regenerating each ``z_{r,j}`` from
``param_seed(s_t, r*n+j, index)``::

    theta <- theta - lr / (N n) * sum_{r,j} g_{r,j} z_{r,j}     (+ weight decay once)

so the replicas stay bit-identical. Choices against the reference (``justonebyte``
``app.py``): seeds come from ``(step seed, stream)`` instead of timestamps; the
update is the n-SPSA mean ``1/(N n)`` (the reference uses ``1/sqrt(N n)``), so one
process with ``n = N`` samples on the same data makes the same step.

Bytes per step and process: ``n * 4`` sent (float32), ``(N-1) * n * 4`` received;
with ``one_byte=True`` each ``g`` travels as one signed byte (below). Every
process, the sender included, applies the *decoded* values, so replicas stay equal.

One byte (the paper's name; the reference computes it but sends the float):
``power = round(k ln|g|)``, ``g^ = sign(g) exp(power / k)``, which has relative
error ``|g^/g - 1| <= exp(1/(2k)) - 1`` while ``|power| <= 63``. The reference's
``k = 16`` with ``|power| <= 127`` plus a sign bit needs 9 bits; to fit a signed
byte we keep 7 bits of ``power`` (code ``c = sign(g) * (power + 64)``, ``c = 0``
for ``g = 0``) and use ``k = 8`` by default: error <= 6.45% for
``3.8e-4 <= |g| <= 2.6e3`` (clamped outside).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_MAX_POWER = 63


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def encode_one_byte(g: torch.Tensor, levels_per_efold: int = 8) -> torch.Tensor:
    """float tensor -> int8 codes (sign * (round(k ln|g|) + 64), 0 for g == 0)."""
    g = g.double()
    power = torch.round(levels_per_efold * torch.log(g.abs().clamp_min(1e-300)))
    magnitude = power.clamp(-_MAX_POWER, _MAX_POWER) + (_MAX_POWER + 1)  # 1..127
    return (torch.sign(g) * magnitude).to(torch.int8)


def decode_one_byte(code: torch.Tensor, levels_per_efold: int = 8) -> torch.Tensor:
    """int8 codes -> float64 values ``sign * exp(power / k)``."""
    c = code.double()
    power = c.abs() - (_MAX_POWER + 1)
    return torch.sign(c) * torch.exp(power / levels_per_efold)


def one_byte_bound(levels_per_efold: int = 8) -> float:
    """Largest relative error of the codec for ``|g|`` inside its range."""
    return math.exp(0.5 / levels_per_efold) - 1.0


class GradExchange:
    """Gathers the projected gradients of all processes, in rank order, and counts bytes."""

    def __init__(self, one_byte: bool = False, levels_per_efold: int = 8, group=None):
        if not isinstance(levels_per_efold, int) or levels_per_efold < 1:
            raise ValueError(f"optim.levels_per_efold: must be an int >= 1, got {levels_per_efold!r}")
        self.one_byte, self.levels, self.group = bool(one_byte), levels_per_efold, group
        self.bytes_sent = 0  # totals over the run, this process
        self.bytes_received = 0
        self.one_replica = False  # True: the processes hold one (FSDP2-sharded) model, nothing to exchange

    def rank_world(self) -> tuple[int, int]:
        return (0, 1) if self.one_replica else world(self.group)

    def __call__(self, local: list[float]) -> list[float]:
        """Local ``[g_{r,0..n-1}]`` -> ``[g_{0,0}, ..., g_{N-1,n-1}]`` as every process applies them."""
        values = torch.tensor(local, dtype=torch.float64)
        payload = encode_one_byte(values, self.levels) if self.one_byte else values.float()
        _, size = self.rank_world()
        if size > 1:
            # NCCL only moves CUDA tensors; gloo takes CPU ones
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
                else torch.device("cpu")
            send = payload.to(device)
            gathered = [torch.empty_like(send) for _ in range(size)]
            dist.all_gather(gathered, send, group=self.group)
            payload = torch.cat(gathered).cpu()
        self.bytes_sent += values.numel() * payload.element_size()
        self.bytes_received += (payload.numel() - values.numel()) * payload.element_size()
        decoded = decode_one_byte(payload, self.levels) if self.one_byte else payload.double()
        return decoded.tolist()
