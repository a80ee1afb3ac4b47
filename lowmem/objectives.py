"""Training objectives: next-token loss, and MeZO's candidate classification.

``causal_lm_loss(model, batch)``
    The model's own teacher-forced cross-entropy; ``batch`` holds ``input_ids``
    ``(B, T)``, ``labels`` ``(B, T)`` (``-100`` = ignored) and optionally
    ``attention_mask``.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Teacher-forced next-token loss of a Hugging Face causal LM (mean over unmasked labels)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
    return model(**inputs).loss


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
        bos = self.tokenizer.bos_token_id
        adds_bos = bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]
        self._bos = [bos] if adds_bos else []
        fixed = len(self._bos) + len(self._prefix) + len(self._suffix) + max(map(len, self._options))
        if fixed >= self.max_length:
            raise ValueError(f"objective.max_length: {self.max_length} leaves no room for the text "
                             f"(template and longest candidate take {fixed} tokens)")
        self._text_budget = self.max_length - fixed

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    def prompt_ids(self, text: str) -> list[int]:
        """BOS + template prefix + the text's last tokens that fit + template suffix."""
        text_ids = self._encode(text)[-self._text_budget:] if self._text_budget else []
        return self._bos + self._prefix + text_ids + self._suffix

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
                position_ids=batch["position_ids"], logits_to_keep=keep + 1)
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
