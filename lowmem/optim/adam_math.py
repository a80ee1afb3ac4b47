"""The Adam-moment update shared by GaLore, APOLLO and FRUGAL, written once in fp32.

Adam (Kingma & Ba, 2015) on a (possibly projected) gradient ``R``, step ``t``::

    M <- b1 M + (1 - b1) R
    V <- b2 V + (1 - b2) R^2
    N  = M / (sqrt(V) + eps')          step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)

and the caller applies ``W -= step_size * f(N)``. With ``eps' = eps`` this is the
"HF-style" rule of galore-torch / apollo-torch (eps not bias-corrected); with
``eps' = eps * sqrt(1 - b2^t)`` it is algebraically torch.optim.AdamW's rule
(FRUGAL's state-full part, and bitsandbytes' fused kernel).

The moments live in a :class:`~lowmem.optim.state_store.MomentStore` (fp32, or
8-bit blockwise with ``state_bits=8``, for the projected groups and the plain AdamW
group alike); the math sees fp32 tensors either way, one chunk of whole
quantization blocks at a time.
:class:`MomentOptimizer` is the small base class of the three optimizers: it
owns the store (their ``@typed`` constructors validate the arguments); the per-param ``step`` loop is
:class:`DenseGradOptimizer`'s, shared with the 8-bit optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from lowmem.optim.dtensor import is_sharded, local_rows, plain_param, row_shard, sum_over_shards, whole_grad
from lowmem.optim.projection import current_factors, project, project_back, refresh_due

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def has_moments(state: dict) -> bool:
    return any(k.startswith("exp_avg") for k in state)


def clear_moments(state: dict) -> None:
    """Drop both moments (any storage layout)."""
    for key in [k for k in state if k.startswith("exp_avg")]:
        del state[key]


def adam_step_size(lr: float, betas: tuple[float, float], t: int, correct_bias: bool = True) -> float:
    """``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (bias-corrected) or ``lr``."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - betas[1] ** t) / (1.0 - betas[0] ** t)


def adam_normalized_chunks(state: dict, store, grad: torch.Tensor, betas: tuple[float, float], eps: float,
                           t: int, torch_eps: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
    """Update the moments of ``state`` with ``grad`` (any float dtype, read as fp32) and yield
    ``(elements, N[elements])`` of the flat fp32 ``N``, one :meth:`MomentStore.chunks` piece at a
    time (issue #8): the maths is elementwise, so the pieces equal a whole-tensor pass bit for bit,
    and the dequantized moments, ``sqrt(V)`` and ``N`` exist for one chunk only.

    Moments are created on first use; ``t`` is the step count after increment.
    """
    beta1, beta2 = betas
    if not has_moments(state):
        for key in MOMENT_KEYS:
            store.init(state, key, grad)
    eps_hat = eps * math.sqrt(1.0 - beta2 ** t) if torch_eps else eps
    flat = grad.reshape(-1)
    for chunk in store.chunks(grad.numel()):
        g = flat[chunk[0]].float()
        m = store.load(state, "exp_avg", g.shape, signed=True, chunk=chunk)
        v = store.load(state, "exp_avg_sq", g.shape, signed=False, chunk=chunk)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        normalized = m / v.sqrt().add_(eps_hat)
        store.store(state, "exp_avg", m, signed=True, chunk=chunk)
        store.store(state, "exp_avg_sq", v, signed=False, chunk=chunk)
        yield chunk[0], normalized


def adam_normalized(state: dict, store, grad: torch.Tensor, lr: float, betas: tuple[float, float],
                    eps: float, t: int, torch_eps: bool = False,
                    correct_bias: bool = True) -> tuple[torch.Tensor, float]:
    """Update the moments of ``state`` with ``grad`` and return ``(N, step_size)``, ``N`` whole
    (:func:`adam_normalized_chunks` assembled)."""
    normalized = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    flat = normalized.view(-1)
    for part, piece in adam_normalized_chunks(state, store, grad, betas, eps, t, torch_eps):
        flat[part] = piece
    return normalized, adam_step_size(lr, betas, t, correct_bias)


def decoupled_weight_decay(p: torch.Tensor, lr: float, weight_decay: float) -> None:
    """``W <- W - lr * wd * W`` (Loshchilov & Hutter), as the reference packages write it."""
    if weight_decay > 0.0:
        p.add_(p, alpha=-lr * weight_decay)


class DenseGradOptimizer(torch.optim.Optimizer):
    """The ``step`` loop every optimizer here shares: run the closure under grad, walk the groups'
    parameters (with their ``param_names`` where the group has them) and hand each one with a
    dense gradient to ``_step_param(p, group, name)``; a sparse gradient raises ``_sparse_error``.
    A parameter sharded by FSDP2 is stepped through a plain stand-in (:mod:`lowmem.optim.dtensor`).
    ``load_state_dict`` keeps the saved state dtypes.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise self._sparse_error(name)
                if is_sharded(p):  # FSDP2: a plain stand-in (lowmem.optim.dtensor)
                    with plain_param(self, p, whole=not self.steps_rows(group, p)) as local:
                        self._step_param(local, group, name)
                    continue
                self._step_param(p, group, name)
        return loss

    def elementwise(self, group: dict) -> bool:
        """Whether ``group``'s update of an element reads that element alone (then an FSDP2 rank
        steps its own shard; otherwise it steps the all-gathered matrix: :mod:`lowmem.optim.dtensor`)."""
        return False

    def steps_rows(self, group: dict, p: torch.Tensor) -> bool:
        """Whether an FSDP2 rank steps ``p`` (a sharded parameter of ``group``) on its own rows: the
        elementwise rules, and rules whose whole-matrix quantities are sums over the rows, all-reduced
        (:func:`lowmem.optim.dtensor.sum_over_shards`) into state every rank holds alike."""
        return self.elementwise(group)

    def gathers_gradient(self, group: dict, p: torch.Tensor) -> bool:
        """Whether an FSDP2 rank all-gathers the whole gradient of ``p`` (:func:`~lowmem.optim.dtensor.whole_grad`)
        in some step: a matrix not stepped on its rows, every step; the rules whose SVD refresh reads the whole
        gradient (every ``T`` steps, the first included) say so themselves. What the FSDP2 plan counts
        (:mod:`lowmem.planner.fsdp`)."""
        return not self.steps_rows(group, p)

    def _sparse_error(self, name: str | None) -> Exception:
        return RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    def _step_param(self, p: torch.Tensor, group: dict, name: str | None) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        """Load keeping each state tensor's dtype (fp32 moments of a bf16 model, 8-bit codes, indices)."""
        from lowmem.optim.state_store import load_keeping_dtypes  # the 8-bit kernels load on first use

        load_keeping_dtypes(self, state_dict, super().load_state_dict)


class MomentOptimizer(DenseGradOptimizer):
    """Base of GaLore/APOLLO/FRUGAL: the moment store and the param loop.

    Subclasses validate their arguments with a ``@typed`` constructor (:mod:`lowmem.optim.args`)
    and implement ``_update(p, group, state)`` for one parameter with a gradient.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 state_bits: int, **extra_defaults):
        from lowmem.optim.state_store import MomentStore  # 8-bit kernels load on first use

        self.store = MomentStore(state_bits)
        self.state_bits = state_bits
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **extra_defaults)
        super().__init__(params, defaults)

    def _step_param(self, p: torch.Tensor, group: dict, name: str | None) -> None:
        state = self.state[p]
        state.setdefault("step", 0)
        self._update(p, group, state)

    def _update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _low_rank_adam(self, p: torch.Tensor, group: dict, state: dict, random: bool):
        """The prologue GaLore and APOLLO share: project ``G`` (refreshing ``P`` when due), count
        the step, run Adam on the projection. Returns ``(G, R, N, step_size, u, v)`` in fp32. For the
        rows of an FSDP2 shard (``steps_rows``) ``G`` is those rows, ``R`` (all-reduced: ``r n`` or ``m r``
        values) and so ``N`` and the Adam state are the whole projection, as one process has them, and
        ``u``/``v`` the whole factors; an SVD refresh (every ``T`` steps) all-gathers the whole gradient."""
        g = p.grad.float()
        shard = row_shard(p)  # FSDP2: g holds this rank's rows
        source = g
        if shard is not None and not random and refresh_due(state["step"], "proj_u" in state or "proj_v" in state,
                                                            group["update_proj_gap"]):
            source = whole_grad(shard).float()  # the SVD reads the whole gradient
        u, v = current_factors(state, source, group["rank"], group["proj_type"], group["update_proj_gap"],
                               random=random, dtype=p.dtype, shape=None if shard is None else shard.shape)
        low = self._project(g, u, v, p)
        state["step"] += 1
        normalized, step_size = adam_normalized(state, self.store, low, group["lr"], group["betas"], group["eps"],
                                                state["step"], correct_bias=group["correct_bias"])
        return g, low, normalized, step_size, u, v

    @staticmethod
    def _project(g: torch.Tensor, u, v, p: torch.Tensor) -> torch.Tensor:
        """``R = u^T G v^T`` (:func:`~lowmem.optim.projection.project`); for the rows ``g`` of the FSDP2 shard the
        stand-in ``p`` holds, the whole ``R``: ``u^T G (v^T)`` is a sum over the row shards (``r n`` values
        all-reduced), ``G v^T`` this rank's rows of it put together (zeros elsewhere; ``m r`` values)."""
        shard = row_shard(p)
        if shard is None:
            return project(g, u, v)
        rows = local_rows(shard)[0]
        if u is not None:
            return sum_over_shards(project(g, u[rows], v), p)
        low = torch.zeros(shard.shape[0], v.shape[0], dtype=g.dtype, device=g.device)
        low[rows] = project(g, None, v)
        return sum_over_shards(low, p)

    @staticmethod
    def _project_back(normalized: torch.Tensor, u, v, p: torch.Tensor) -> torch.Tensor:
        """``u N v`` (:func:`~lowmem.optim.projection.project_back`), or its rows held by the stand-in ``p``
        of an FSDP2 shard: ``u``'s rows times ``N v``, or ``N``'s rows times ``v``."""
        shard = row_shard(p)
        if shard is None:
            return project_back(normalized, u, v)
        rows = local_rows(shard)[0]
        return project_back(normalized, u[rows], v) if u is not None else project_back(normalized[rows], None, v)

    def _adamw_update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Plain HF-style AdamW for a parameter outside the low-rank groups (often the largest:
        the embedding and ``lm_head``), applied chunk by chunk."""
        state["step"] += 1
        step_size = adam_step_size(group["lr"], group["betas"], state["step"], group["correct_bias"])
        flat = p.view(-1)
        for part, normalized in adam_normalized_chunks(state, self.store, p.grad, group["betas"], group["eps"],
                                                       state["step"]):
            flat[part].add_(normalized.to(p.dtype), alpha=-step_size)
        decoupled_weight_decay(p, group["lr"], group["weight_decay"])
