"""One dense copy of a tied embedding's gradient in backward, for layer-wise mode (issue 15).

With ``tie_word_embeddings`` the token embedding ``E`` (V, H) is also the LM head's weight. Its
gradient has two parts that arrive at opposite ends of backward::

    dL/dE = G_head + G_lookup
    G_head   = dlogits^T h                      dense (V, H): computed first, by the head's backward
    G_lookup[r] = sum_{i : ids_i = r} dh0_i     non-zero only on the batch's rows: computed last

PyTorch's embedding backward returns ``G_lookup`` as a dense (V, H) tensor, and the autograd
engine adds it out of place to ``G_head``, which it has held since the head's backward (a view:
``linear``'s weight gradient is a transpose of a transpose of an ``mm``; a sparse ``G_lookup``
would be added out of place too, the engine treats sparse tensors like subclasses). So at the
end of backward three (V, H) tensors are live: 3 x 108 MiB on SmolLM2-135M, which set the peak
of a layer-wise step (measured 1293 MiB against 1078 MiB just before the lookup's backward).

:func:`install_row_gradients` hands ``G_head`` from the head to the lookup outside the engine:

1. the head's backward (:class:`_TiedHead`) computes ``G_head = g^T h`` (the same ``mm`` as
   ``linear``'s backward), keeps it in the model's :class:`_Handover` and returns no weight
   gradient; a second head call before the lookup (a chunked loss: one per chunk) is added in
   place, in arrival order, as the engine adds them;
2. the lookup's backward (:class:`_RowGradientLookup`) adds its row sums in place into that
   tensor and returns it as the weight's only gradient, which ``AccumulateGrad`` takes as
   ``.grad`` without a copy. With nothing handed over (the head unused) it returns the rows as
   a sparse COO tensor (layer-wise mode densifies it);
3. a head gradient still held when backward ends (the lookup took no part) is added to
   ``.grad`` by an engine callback, so no gradient is ever lost.

Exactness: each row's sum is formed in token order from zero, as the dense backward forms it
(``index_add`` over the tokens), stored at the row's first token (the row's other tokens carry
zeros, which add exactly), and added once to ``G_head``: the result is bit-identical to the dense
path's ``G_head + G_lookup``. ``padding_idx`` rows get no gradient, as in ``F.embedding``. Shapes
never depend on the data (no ``unique``), so the planner's fake-tensor trace runs it too.

Only a plain ``nn.Embedding`` (its class does not override ``forward``, e.g. no scaled Gemma
embedding) without ``max_norm``/``scale_grad_by_freq``/``sparse`` whose weight is that of a plain
bias-free ``nn.Linear`` output head is changed; anything else keeps the dense path. A causal LM
runs the head's backward before the lookup's (the head consumes the body's output); layer-wise
mode relies on it, as the weight is stepped when ``AccumulateGrad`` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Handover:
    """The head's dense weight gradient, held from the head's backward to the lookup's."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.grad: torch.Tensor | None = None

    def put(self, grad: torch.Tensor) -> None:
        if self.grad is None:
            self.grad = grad
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
        else:
            self.grad.add_(grad)

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad

    def flush(self) -> None:
        """End of backward: a head gradient that no lookup took goes to ``.grad`` (step 3)."""
        grad = self.take()
        if grad is not None:
            w = self.weight
            w.grad = grad if w.grad is None else w.grad.add_(grad)


class _TiedHead(torch.autograd.Function):
    """``F.linear(h, weight)`` whose weight gradient goes to the handover (step 1)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, handover: _Handover) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.handover = handover
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])                       # (N, V)
        grad_h = g.mm(weight).view(h.shape) if ctx.needs_input_grad[0] else None  # (..., H)
        if ctx.needs_input_grad[1]:
            ctx.handover.put(g.t().mm(h.reshape(-1, h.shape[-1])))         # (V, H): dlogits^T h
        return grad_h, None, None


class _RowGradientLookup(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` whose backward adds its rows to the handed-over
    head gradient (step 2)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None,
                handover: _Handover) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.padding_idx, ctx.handover = weight.shape, padding_idx, handover
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)                                   # (N,)
        grad = grad_out.reshape(flat.numel(), -1)                # (N, H)
        if ctx.padding_idx is not None:
            grad = grad.masked_fill((flat == ctx.padding_idx).unsqueeze(-1), 0)
        # the first token of each row: first[i] = min{j : ids_j = ids_i}
        n = flat.numel()
        first = torch.full((ctx.weight_shape[0],), n, dtype=flat.dtype, device=flat.device)
        first = first.scatter_reduce(0, flat, torch.arange(n, device=flat.device), "amin")[flat]
        rows = torch.zeros_like(grad).index_add_(0, first, grad)  # (N, H): row sums at first tokens
        dense = ctx.handover.take()
        if dense is not None:
            return None, dense.index_add_(0, flat, rows.to(dense.dtype)), None, None
        return None, torch.sparse_coo_tensor(flat.unsqueeze(0), rows, ctx.weight_shape,
                                             check_invariants=False), None, None


def tied_pair(model: torch.nn.Module) -> tuple[torch.nn.Embedding, torch.nn.Linear] | None:
    """``model``'s input embedding and output head when they share their weight and both can be
    replaced (see the module docstring), else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    emb, head = get_in(), get_out()
    if (not isinstance(emb, torch.nn.Embedding) or type(emb).forward is not torch.nn.Embedding.forward
            or not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward
            or head.weight is not emb.weight or head.bias is not None):
        return None
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse or not emb.weight.requires_grad:
        return None
    return emb, head


def install_row_gradients(model: torch.nn.Module):
    """Route ``model``'s tied embedding gradient as above; returns a function that undoes it, or
    None when nothing was changed. ``weight.grad`` is dense whenever the head took part in the
    loss; a caller that may see a sparse one (the lookup's rows alone) densifies it."""
    pair = tied_pair(model)
    if pair is None:
        return None
    emb, head = pair
    handover = _Handover(emb.weight)

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        return _RowGradientLookup.apply(ids, emb.weight, emb.padding_idx, handover)

    def project(h: torch.Tensor) -> torch.Tensor:
        return _TiedHead.apply(h, head.weight, handover)

    emb.forward, head.forward = lookup, project  # instance attributes: ``del`` restores the classes'

    def undo() -> None:
        for module, fn in ((emb, lookup), (head, project)):
            if module.__dict__.get("forward") is fn:
                del module.forward

    return undo
