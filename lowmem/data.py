"""Local text data: read documents, split train/eval, tokenize, pack, batch deterministically.

Documents come from ``.txt`` files (one document per file; its label, for
classification, is the name of the folder that holds it) or ``.jsonl`` files
(one document per line, text in ``data.text_field``, label in ``label``).

For the LM task the token streams of all documents, each opened as the tokenizer
opens a text (its BOS, where it adds one) and closed by EOS, are concatenated and
cut into rows of ``seq_len`` tokens, each row starting as a text does
(:func:`pack_tokens`). SFT examples (:mod:`lowmem.sft`) are packed whole
(:func:`pack_examples`, best-fit decreasing).

A packed row holds several documents, which must not see each other (issue 29):
its ``position_ids`` restart at 0 at each document, which transformers turns into a
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices`` under
sdpa/eager when no ``attention_mask`` is passed; varlen flash attention on a GPU),
and the first token of each document gets label -100, so it is not predicted from
the document before. The loss of a row is then the token-weighted sum of its
documents' own losses (TRL's padding-free packing, ``DataCollatorWithFlattening``).
``data.packing: false`` puts one document per row instead, right-padded to the
longest of its micro-batch with an ``attention_mask`` (:class:`PaddedBatches`).

The order of rows in epoch ``e`` is a permutation drawn from ``torch.Generator().manual_seed(seed + e)``,
so the micro-batch at any position is a pure function of (seed, position):
resuming needs only the position.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lowmem.models import resolve_path, text_start_ids
from lowmem.objectives import IGNORE_INDEX

if TYPE_CHECKING:  # the recipe, a layer above, embeds this section; only its type is needed here
    from lowmem.recipe import DataSection

Example = tuple[list[int], list[int]]  # (input_ids, labels) of one document, labels -100 where no loss


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


def document_positions(starts: torch.Tensor) -> torch.Tensor:
    """``position_ids`` (N, T) that restart at 0 wherever ``starts`` (N, T, bool) is True (and at column 0)::

        p[t] = t - max{s <= t : starts[s]}
    """
    t = torch.arange(starts.shape[1]).expand_as(starts)
    starts = starts.clone()
    starts[:, 0] = True
    return t - torch.where(starts, t, 0).cummax(-1).values


def block_diagonal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The causal mask of packed documents, ``(B, 1, T, T)`` bool (True: may attend), for a model whose own
    mask ignores ``position_ids`` (OPT): token ``q`` sees ``k <= q`` of its own document (starting where
    ``position_ids`` is 0). transformers uses a 4-D mask as given."""
    doc = (position_ids == 0).cumsum(-1)  # (B, T) document index
    t = torch.arange(position_ids.shape[1], device=position_ids.device)
    return ((doc[:, :, None] == doc[:, None, :]) & (t[None, :, None] >= t[None, None, :]))[:, None]


def lm_rows(rows: torch.Tensor, eos_token_id: int) -> dict[str, torch.Tensor]:
    """Packed LM rows (:func:`pack_tokens`) as the model sees them: a document starts at column 0 and after
    each EOS; ``position_ids`` restart there and the document's first token is not a target."""
    starts = torch.zeros_like(rows, dtype=torch.bool)
    starts[:, 1:] = rows[:, :-1] == eos_token_id
    starts[:, 0] = True
    return {"input_ids": rows, "labels": rows.masked_fill(starts, IGNORE_INDEX),
            "position_ids": document_positions(starts)}


def lm_examples(docs: list[Document], tokenizer, seq_len: int) -> tuple[list[Example], int]:
    """One example per document (``data.packing: false``): ``S doc EOS`` cut to ``seq_len`` tokens;
    returns the examples and how many were cut."""
    start = text_start_ids(tokenizer)
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    full = [[*start, *doc, tokenizer.eos_token_id] for doc in ids]
    return [(x[:seq_len], x[:seq_len]) for x in full], sum(len(x) > seq_len for x in full)


def pack_examples(examples: list[Example], seq_len: int, pad_id: int, field: str) -> dict[str, torch.Tensor]:
    """Whole examples packed into rows of ``seq_len`` tokens by best-fit decreasing (longest first, each into
    the fullest row it fits; ties by order, so deterministic). The rest of a row is padding: ``pad_id``,
    label -100, positions restarting as one more document that nothing real attends to (causal mask)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = len(examples[i][0])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (seq_len - n, len(rows) - 1))
        else:
            left, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (left - n, r))
    if not rows:
        raise ValueError(f"{field}: no example to train on")
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            x, y = examples[i]
            ids[r, col:col + len(x)], labels[r, col:col + len(x)] = torch.tensor(x), torch.tensor(y)
            starts[r, col] = True
            col += len(x)
        if col < seq_len:
            starts[r, col] = True
    labels = labels.masked_fill(starts, IGNORE_INDEX)  # a document's first token is not predicted from another's
    tokens = torch.tensor([sum(len(examples[i][0]) for i in m) for m in rows])
    return {"input_ids": ids, "labels": labels, "position_ids": document_positions(starts), "tokens": tokens}


def pad_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest: ``input_ids``, ``labels`` (-100 on padding),
    ``attention_mask`` (0 on padding)."""
    width = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for r, (x, y) in enumerate(examples):
        ids[r, :len(x)], labels[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def held_out_batches(data: dict[str, torch.Tensor] | list[Example], batch_size: int, count: int,
                     pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` micro-batches of held-out packed rows (a dict of (N, T) tensors) or examples
    (padded per micro-batch), in order."""
    if isinstance(data, list):
        held = data[: count * batch_size]
        return [pad_examples(held[i:i + batch_size], pad_id) for i in range(0, len(held), batch_size)]
    n = min(count * batch_size, len(data["input_ids"]))
    return [{k: v[i:i + batch_size] for k, v in data.items() if k != "tokens"} for i in range(0, n, batch_size)]


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
    """Packed rows: ``batch(position)`` -> ``{input_ids, labels, position_ids}`` of shape (B, T).

    ``rows``: those tensors (N, T) (:func:`lm_rows`, :func:`pack_examples`), and optionally ``tokens`` (N,),
    the non-padding tokens of each row (default: all T)."""

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int, seed: int):
        rows = dict(rows)
        n, width = rows["input_ids"].shape
        tokens = rows.pop("tokens", torch.full((n,), width))
        super().__init__(n, batch_size, seed)
        self.rows, self.mean_tokens = rows, tokens.float().mean().item()
        self.block_mask = False  # True: also pass block_diagonal_mask (a model whose mask ignores position_ids)

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        index = self.indices(position)
        batch = {k: v[index] for k, v in self.rows.items()}  # (B, T) each
        if self.block_mask:
            batch["attention_mask"] = block_diagonal_mask(batch["position_ids"])
        return batch

    def tokens_per_batch(self) -> float:
        """Non-padding tokens of a micro-batch, on average over the rows."""
        return self.mean_tokens * self.batch_size


class PaddedBatches(_ShuffledBatches):
    """One example per row (``data.packing: false``): ``batch(position)`` -> :func:`pad_examples` of B examples."""

    def __init__(self, examples: list[Example], pad_id: int, batch_size: int, seed: int):
        super().__init__(len(examples), batch_size, seed)
        self.examples, self.pad_id = examples, pad_id
        self.mean_tokens = sum(len(x) for x, _ in examples) / len(examples)

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        return pad_examples([self.examples[i] for i in self.indices(position).tolist()], self.pad_id)

    def tokens_per_batch(self) -> float:
        return self.mean_tokens * self.batch_size


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
