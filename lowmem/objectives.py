"""Training objectives: next-token loss, and MeZO's candidate classification.

``causal_lm_loss(model, batch, chunk_tokens=None)``
    The teacher-forced next-token cross-entropy; ``batch`` holds ``input_ids``
    ``(B, T)``, ``labels`` ``(B, T)`` (``-100`` = ignored) and optionally
    ``attention_mask`` and ``position_ids``. ``chunk_tokens=None`` is the model's own
    loss; an integer computes the same loss without the ``(B*T, V)`` logits
    (recipe field ``train.loss_chunk_tokens``, see :func:`causal_lm_loss`).

Candidate classification (MeZO, Malladi et al. 2023, §3 and ``large_models/run.py``
``--train_as_classification``): each example ``(text, label)`` is turned into one
prompt ``template.format(text=text)`` (e.g. ``"{text}\\nTopic:"``) followed by each
candidate answer ``v_c`` (a verbalizer, e.g. ``" sport"``). With ``o_c`` the option
tokens of candidate ``c``::

    s_c  = 1/|o_c| sum_{t in o_c} log p(x_t | x_<t)        # length-normalised log-likelihood
    loss = -log softmax_c(s)[label]   (mean over examples)  ;  accuracy = mean[argmax_c s_c == label]

Batch format built by :class:`CandidateCollator` (``C`` candidates, ``B`` examples):

* ``input_ids``      ``(B*C, T)`` long -- row ``b*C + c`` = prompt of example ``b`` +
  candidate ``c``, **left**-padded, so every row's options end at column ``T-1``;
* ``attention_mask`` ``(B*C, T)`` long -- 0 on padding;
* ``position_ids``   ``(B*C, T)`` long -- ``cumsum(mask) - 1``, so padding does not
  shift positions (absolute-position models such as GPT-2 and OPT need it);
* ``option_mask``    ``(B*C, T)`` bool -- True on the candidate's tokens;
* ``labels``         ``(B,)`` long -- the index of the right candidate.

Too long prompts lose the *start of the text* (left truncation): the template
around ``{text}`` and the candidate are always kept whole. Only the last
``max option length`` positions of logits are computed (``logits_to_keep``), so
the loss costs ``B*C*K*V`` floats, not ``B*C*T*V``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lowmem.models import text_start_ids

IGNORE_INDEX = -100
# config fields with which a model's forward changes the logits after the output head
# (Gemma-2 soft-capping, Cohere, Granite, Granite-MoE multipliers): the chunked loss would differ
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def loss_terms(batch: dict) -> int:
    """How many terms a batch's mean loss averages: the predicted tokens of an LM batch (``labels``
    ``(B, T)``: positions ``1..T-1`` not ``-100``, the shift of :func:`causal_lm_loss`), the examples of
    a classification batch (``labels`` ``(B,)``). Weights that make a mean over several batches the
    mean over their union."""
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.dim() == 2 else labels.numel()


def causal_lm_loss(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """Teacher-forced next-token loss of a Hugging Face causal LM (mean over unmasked labels).

    ``chunk_tokens=None``: ``model(**batch).loss``. Otherwise the same value from the decoder's
    final hidden states ``h`` ``(B, T, H)`` and the output head ``W`` ``(V, H)``::

        loss = 1/|M| * sum_{c} sum_{i in c, i in M} [logsumexp_v (W h_i)_v - (W h_i)_{y_i}]

    with ``y_i = labels[i + 1]`` (the shift Hugging Face applies), ``M`` the positions whose
    label is not -100, and ``c`` consecutive chunks of ``chunk_tokens`` positions. Why: the
    model's own loss keeps the fp32 ``(B*T, V)`` logits and their log-softmax for backward, which
    dominate a small model's activations (SmolLM2-135M, V = 49152: 400 MB per 2048 tokens). Here
    each chunk runs under non-reentrant activation checkpointing: only ``h`` is kept, and the
    backward recomputes one chunk's logits at a time, so at most ``chunk_tokens * V`` logits
    exist at once. Under ``no_grad`` (zeroth-order closures, evaluation) nothing is kept and the
    chunks just bound the peak. ``h`` comes from ``model``'s own forward (see
    :func:`final_hidden_states`), so a DDP-wrapped ``model`` synchronises the gradients. Under FSDP2
    (:mod:`lowmem.fsdp`) the head belongs to the root's group, which FSDP2 does not reshard after the
    root's forward: the chunks (and their recomputation in backward) call it on the all-gathered
    weight (the embedding's, when tied), and the root's post-backward callback, which runs when the
    whole backward is done, reduce-scatters its gradient.
    """
    if chunk_tokens is None:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        return model(**inputs, use_cache=False).loss  # no KV cache: nothing will be generated
    hidden, head = final_hidden_states(model, batch)             # (B, T, H)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])        # positions that have a next token
    labels = batch["labels"][:, 1:].reshape(-1).to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_cross_entropy, head, hidden[rows], labels[rows], use_reentrant=False)
        else:
            total = total + _summed_cross_entropy(head, hidden[rows], labels[rows])
    return total / (labels != IGNORE_INDEX).sum()


def final_hidden_states(model, batch: dict) -> tuple[torch.Tensor, torch.nn.Linear]:
    """The decoder body's output ``(B, T, H)`` for ``batch``, and the output head.

    Runs ``model``'s own forward, not the body alone: a data-parallel wrapper (DDP) only syncs the
    gradients of a forward it ran. ``logits_to_keep=1`` makes the model apply its head to the last
    position only (``(B, 1, V)`` logits, unused); a forward hook on the body, removed afterwards,
    catches its ``last_hidden_state``.
    """
    body, head = lm_body_and_head(getattr(model, "module", model))  # DDP keeps the model in .module
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    caught = {}
    hook = body.register_forward_hook(lambda module, args, out: caught.update(hidden=out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return caught["hidden"], head


def _summed_cross_entropy(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``-log softmax(head(hidden).float())[label]`` (-100 rows count 0)."""
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def lm_body_and_head(model):
    """The decoder body (hidden states before the head) and the output head of ``model``, or a
    one-line ValueError when the chunked loss could not reproduce ``model(**batch).loss``."""
    field = "train.loss_chunk_tokens"
    name = type(model).__name__
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        raise ValueError(f"{field}: {name} is not a Hugging Face causal LM with a decoder and an output head; "
                         "set it to null")
    body, head = get_decoder(), get_head()
    if body is model or not isinstance(head, torch.nn.Linear) or hasattr(head, "wta_keep_ratio"):
        raise ValueError(f"{field}: cannot find the decoder body and a plain nn.Linear output head of {name}; "
                         "set it to null")
    text_config = model.config.get_text_config()
    changed = [k for k in LOGIT_TRANSFORMS if getattr(text_config, k, None) not in (None, 1, 1.0)]
    if changed:
        raise ValueError(f"{field}: {name} transforms its logits after the head ({changed[0]}); set it to null")
    forward = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward  # peft passes **kwargs on
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        raise ValueError(f"{field}: {name}'s forward has no logits_to_keep argument; set it to null")
    loss_type = getattr(model, "loss_type", None)  # None: transformers' default, the causal LM loss
    if loss_type not in (None, "ForCausalLM"):
        raise ValueError(f"{field}: {name} uses the {loss_type} loss, not the causal LM cross-entropy; set it to null")
    return body, head


@dataclass
class CandidateCollator:
    """``collate([(text, label), ...]) -> batch`` for :func:`classification_loss` (format above)."""

    tokenizer: object
    verbalizers: list[str]
    template: str = "{text}\nTopic:"
    max_length: int = 256

    def __post_init__(self):
        if "{text}" not in self.template:
            raise ValueError(f"objective.template: must contain '{{text}}', got {self.template!r}")
        if len(self.verbalizers) < 2:
            raise ValueError("objective.verbalizers: need at least two candidates")
        prefix, suffix = self.template.split("{text}", 1)
        self._prefix, self._suffix = self._encode(prefix), self._encode(suffix)
        self._options = [self._encode(v) for v in self.verbalizers]
        if any(not o for o in self._options):
            raise ValueError("objective.verbalizers: a candidate encodes to no token")
        self._start = text_start_ids(self.tokenizer)
        fixed = len(self._start) + len(self._prefix) + len(self._suffix) + max(map(len, self._options))
        if fixed >= self.max_length:
            raise ValueError(f"objective.max_length: {self.max_length} leaves no room for the text "
                             f"(template and longest candidate take {fixed} tokens)")
        self._text_budget = self.max_length - fixed

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    def prompt_ids(self, text: str) -> list[int]:
        """The tokenizer's start of a text (its BOS, if any) + template prefix + the text's last tokens that fit
        + template suffix."""
        text_ids = self._encode(text)[-self._text_budget:] if self._text_budget else []
        return self._start + self._prefix + text_ids + self._suffix

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        rows, options, labels = [], [], []
        for example in examples:
            text, label = (example["text"], example["label"]) if isinstance(example, dict) else example
            if not 0 <= int(label) < len(self.verbalizers):
                raise ValueError(f"label: {label!r} is not a candidate index (0..{len(self.verbalizers) - 1})")
            prompt = self.prompt_ids(text)
            for option in self._options:
                rows.append(prompt + option)
                options.append(len(option))
            labels.append(int(label))
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        option_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, n_opt) in enumerate(zip(rows, options)):  # left padding
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention[i, width - len(row):] = 1
            option_mask[i, width - n_opt:] = True
        position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
                "option_mask": option_mask, "labels": torch.tensor(labels, dtype=torch.long)}


def candidate_scores(model, batch: dict) -> torch.Tensor:
    """``(B, C)`` length-normalised log-likelihoods of each candidate."""
    option_mask = batch["option_mask"]
    keep = int(option_mask.sum(-1).max())  # options sit at the right end (left padding)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep + 1, use_cache=False)
    logits = out.logits[:, -keep - 1:-1].float()  # (B*C, K, V): predicts the last K tokens
    targets = batch["input_ids"][:, -keep:]  # (B*C, K)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = option_mask[:, -keep:].to(token_logp.dtype)
    scores = (token_logp * mask).sum(-1) / mask.sum(-1)  # (B*C,)
    return scores.view(batch["labels"].shape[0], -1)


def classification_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over candidates of the length-normalised log-likelihoods, and the accuracy."""
    scores = candidate_scores(model, batch)  # (B, C)
    labels = batch["labels"]
    loss = F.cross_entropy(scores, labels)
    accuracy = (scores.argmax(-1) == labels).float().mean()
    return loss, accuracy
