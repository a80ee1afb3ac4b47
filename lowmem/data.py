"""Local text data: read documents, split train/eval, tokenize, pack, batch deterministically.

Documents come from ``.txt`` files (one document per file; its label, for
classification, is the name of the folder that holds it) or ``.jsonl`` files
(one document per line, text in ``data.text_field``, label in ``label``).

For the LM task the token streams of all documents, each opened as the tokenizer
opens a text (its BOS, where it adds one) and closed by EOS, are concatenated and
cut into rows of ``seq_len`` tokens, each row starting as a text does
(:func:`pack_tokens`). The order of rows in epoch ``e`` is a permutation drawn from ``torch.Generator().manual_seed(seed + e)``,
so the micro-batch at any position is a pure function of (seed, position):
resuming needs only the position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowmem.models import resolve_path, text_start_ids

if TYPE_CHECKING:  # the recipe, a layer above, embeds this section; only its type is needed here
    from lowmem.recipe import DataSection


@dataclass(frozen=True)
class Document:
    text: str
    label: str | None


def _read_jsonl(path: Path, field: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{lineno}: no string field {field!r} (data.text_field)")
        label = record["label"] if "label" in record else None
        docs.append(Document(record[field], None if label is None else str(label)))
    return docs


def read_documents(path: str, text_field: str, field: str = "data.path") -> list[Document]:
    root = Path(resolve_path(path, field))
    if not root.exists():
        raise ValueError(f"{field}: {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl")) if root.is_dir() else [root]
    if root.is_file() and root.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{field}: {root} is neither .txt nor .jsonl")
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            docs += _read_jsonl(f, text_field)
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs.append(Document(text, f.parent.name if root.is_dir() and f.parent != root else None))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"{field}: {root} holds no text (.txt files or .jsonl lines with {text_field!r})")
    return docs


def split_documents(section: DataSection, seed: int) -> tuple[list[Document], list[Document]]:
    """Train and eval documents; a held-out split is drawn by a seeded shuffle of whole documents."""
    docs = read_documents(section.path, section.text_field)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    docs = [docs[i] for i in order]
    if section.max_documents is not None:
        docs = docs[: section.max_documents]
    if section.eval_path is not None:
        return docs, read_documents(section.eval_path, section.text_field, "data.eval_path")
    n_eval = max(1, round(len(docs) * section.eval_fraction))
    if n_eval >= len(docs):
        raise ValueError(f"data.path: {len(docs)} document(s) are too few to hold out an eval split")
    return docs[n_eval:], docs[:n_eval]


def pack_tokens(docs: list[Document], tokenizer, seq_len: int, field: str) -> torch.Tensor:
    """Pack tokenized documents into rows of ``seq_len`` tokens: (N, seq_len).

    Each document is opened as the tokenizer opens a text (``S`` = its BOS, or nothing: :func:`text_start_ids`)
    and closed by EOS; the stream ``S doc EOS S doc EOS ...`` is cut into rows, and a row that would start
    inside a document gets ``S`` in front, so every row starts as the model's pre-training texts did. With
    no start tokens (SmolLM2) the rows are the plain stream cut every ``seq_len`` tokens.
    """
    start = text_start_ids(tokenizer)
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (*start, *doc, tokenizer.eos_token_id)]
    rows, pos = [], 0
    while True:
        if stream[pos:pos + len(start)] == start:  # a document opens the row (always true without start tokens)
            row, pos = stream[pos:pos + seq_len], pos + seq_len
        else:
            row, pos = start + stream[pos:pos + seq_len - len(start)], pos + seq_len - len(start)
        if len(row) < seq_len:
            break
        rows.append(row)
    if not rows:
        raise ValueError(f"{field}: only {len(stream)} tokens, fewer than one sequence of train.seq_len={seq_len}")
    return torch.tensor(rows, dtype=torch.long)


class _ShuffledBatches:
    """Deterministic micro-batches over ``n`` items: ``indices(position)`` needs no iteration state."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"train.batch_size: {batch_size} exceeds the {n} examples available")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._order = -1, None

    def indices(self, position: int) -> torch.Tensor:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._epoch = epoch
        return self._order[index * self.batch_size:(index + 1) * self.batch_size]


class PackedBatches(_ShuffledBatches):
    """Packed LM rows: ``batch(position)`` -> ``{input_ids, labels}`` of shape (B, T)."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int):
        super().__init__(len(rows), batch_size, seed)
        self.rows = rows

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        ids = self.rows[self.indices(position)]  # (B, T)
        return {"input_ids": ids, "labels": ids.clone()}

    def tokens_per_batch(self) -> int:
        return self.rows.shape[1] * self.batch_size


class CandidateBatches(_ShuffledBatches):
    """Labelled documents for candidate classification, collated by ``lowmem.objectives.CandidateCollator``."""

    def __init__(self, examples: list[tuple[str, int]], collator, batch_size: int, seed: int):
        super().__init__(len(examples), batch_size, seed)
        self.examples, self.collator = examples, collator

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        return self.collator([self.examples[i] for i in self.indices(position).tolist()])

    def tokens_per_batch(self) -> int:
        return self.batch_size * self.collator.max_length


def label_examples(docs: list[Document], labels: list[str], field: str) -> list[tuple[str, int]]:
    """``(text, candidate index)`` pairs; every document's label must have a candidate."""
    index = {label: i for i, label in enumerate(labels)}
    for doc in docs:
        if doc.label not in index:
            raise ValueError(f"data.classification.candidates: no candidate for label {doc.label!r} "
                             f"(labels come from folder names or the 'label' field of {field})")
    return [(d.text, index[d.label]) for d in docs]
