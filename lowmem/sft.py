"""Supervised fine-tuning data (``data.task: sft``): records -> token ids with a loss mask.

Records are read from local ``.jsonl``, ``.json`` and ``.parquet`` files by Hugging Face
``datasets`` (its ``json`` / ``parquet`` builders; the cache in a temporary directory,
deleted after reading). Each record is one of (field names from ``data.sft.fields``):

* a conversation ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the
  tokenizer's own chat template (``apply_chat_template``); the loss is on the assistant turns;
* a pair ``{"prompt": ..., "completion": ...}``, loss on the completion;
* an alpaca record ``{"instruction", "input" (optional), "output"}``: the pair
  ``instruction [+ "\\n\\n" + input]`` / ``output``.

A pair is rendered as a user turn and an assistant turn with the chat template
(``data.sft.chat_template``, default), or as plain text ``S prompt completion EOS`` (``S``:
the tokenizer's start of a text). BOS/EOS are what the template writes (it is tokenized with
``add_special_tokens=False``).

Which tokens belong to an assistant turn: the template is rendered prefix by prefix. With
``R(m, gen)`` the rendered text of the turns ``m`` (``gen``: with the generation prompt),
assistant turn ``i`` covers the characters ``[len R(m[:i], True), len R(m[:i+1], False))``
of ``R(m, False)`` -- its content and the end-of-turn tokens the template writes after it,
so the model learns to stop. Each must be a prefix of the next (templates that rewrite
earlier turns are refused); the text is tokenized once with offsets, and a token is
trained when it starts inside an assistant span. This works for any template (TRL's
``{% generation %}`` masks need a template written for them). Labels are -100 elsewhere
(``data.sft.train_on_prompt: true``: nowhere).

An invalid record stops the run before training with one line naming the file and the
record number (1-based): missing fields, a role outside system/user/assistant/tool or one
the template refuses, an empty completion, a line that is not UTF-8 or not JSON.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lowmem.models import resolve_path, text_start_ids
from lowmem.objectives import IGNORE_INDEX

if TYPE_CHECKING:  # the recipe, a layer above, embeds this section; only its type is needed here
    from lowmem.recipe import SftSection

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A record that cannot be trained on; the message names the file and record."""


def sft_files(path: str, field: str) -> list[Path]:
    root = Path(resolve_path(path, field))
    if not root.exists():
        raise ValueError(f"{field}: {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix in FORMATS) if root.is_dir() else [root]
    if not files or any(f.suffix not in FORMATS for f in files):
        raise ValueError(f"{field}: {root} holds no .jsonl, .json or .parquet file (data.task: sft)")
    return files


def _locate_bad_line(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not UTF-8 or not a JSON object, as 'record N: why'."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"record {n}: not UTF-8 text"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return f"record {n}: not valid JSON"
            if not isinstance(record, dict):
                return f"record {n}: not a JSON object"
    return None


def read_records(path: Path) -> list[dict]:
    """The records of one file, read by ``datasets`` (offline, cache in a temporary directory)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("data.task: sft needs the datasets package (pip install 'lowmem[sft]')") from None
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="lowmem-datasets-") as cache:
        try:
            table = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train", cache_dir=cache)
            return table.to_list()
        except Exception as err:  # datasets/pyarrow raise many kinds; name the record where we can
            where = _locate_bad_line(path) if path.suffix != ".parquet" else None
            kind = "Parquet" if path.suffix == ".parquet" else "JSON"
            why = where or f"cannot read it as {kind} ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
            raise RecordError(f"{path}: {why}") from None


class SftEncoder:
    """``encode(record) -> (input_ids, labels)`` for one record (format in the module docstring)."""

    def __init__(self, tokenizer, section: SftSection):
        self.tokenizer, self.section, self.fields = tokenizer, section, section.fields
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def messages(self, record: dict) -> list[dict] | None:
        """The record as a conversation, or None for a plain-text pair (``chat_template: false``)."""
        f = self.fields
        if record.get(f.messages) is not None:
            turns = record[f.messages]
            if not isinstance(turns, list) or not turns:
                raise RecordError(f"{f.messages!r} is not a non-empty list of turns")
            for turn in turns:
                if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                        or not isinstance(turn.get("content"), str):
                    raise RecordError(f"{f.messages!r}: a turn without a string role and content")
                if turn["role"] not in ROLES:
                    raise RecordError(f"role {turn['role']!r} is not one of {', '.join(ROLES)}")
            answers = [t for t in turns if t["role"] == "assistant"]
            if not answers or any(not t["content"].strip() for t in answers):
                raise RecordError("no assistant turn, or an empty one")
            return [{"role": t["role"], "content": t["content"]} for t in turns]
        prompt, answer = self.pair(record)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}] \
            if self.section.chat_template else None

    def pair(self, record: dict) -> tuple[str, str]:
        f = self.fields
        if record.get(f.prompt) is not None or record.get(f.completion) is not None:
            prompt, answer = record.get(f.prompt), record.get(f.completion)
        elif record.get(f.instruction) is not None or record.get(f.output) is not None:
            extra = record.get(f.input)
            prompt = record.get(f.instruction)
            if isinstance(prompt, str) and isinstance(extra, str) and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            answer = record.get(f.output)
        else:
            raise RecordError(f"none of the fields {f.messages!r}, {f.prompt!r}/{f.completion!r}, "
                              f"{f.instruction!r}/{f.output!r} (data.sft.fields)")
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise RecordError("the prompt and the completion must both be strings")
        if not answer.strip():
            raise RecordError("empty completion")
        return prompt, answer

    def _render(self, turns: list[dict], generation: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # jinja2's TemplateError (raise_exception in a template), or a template bug
            raise RecordError(f"the chat template refuses it ({str(err).strip().splitlines()[0]})") from None

    def _chat(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        text = self._render(turns, False)
        spans, previous = [], ""
        for i, turn in enumerate(turns):
            upto = self._render(turns[: i + 1], False)
            before = (self._render(turns[:i], True) if i else "") if turn["role"] == "assistant" else previous
            if not (upto.startswith(previous) and upto.startswith(before) and text.startswith(upto)):
                raise RecordError("the chat template does not render the conversation prefix by prefix, so the "
                                  "assistant turns cannot be found")
            if turn["role"] == "assistant":
                spans.append((len(before), len(upto)))
            previous = upto
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        trained = [self.section.train_on_prompt or any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]

    def _plain(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        head = text_start_ids(tok) + tok(prompt, add_special_tokens=False)["input_ids"]
        tail = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = head if self.section.train_on_prompt else [IGNORE_INDEX] * len(head)
        return head + tail, labels + tail

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        turns = self.messages(record)
        if turns is None:
            return self._plain(*self.pair(record))
        if not self.has_template:
            raise ValueError("model.tokenizer: has no chat template (tokenizer.chat_template); conversations need "
                             "one, and prompt/completion pairs need data.sft.chat_template: false")
        return self._chat(turns)


def sft_examples(path: str, field: str, tokenizer, section: SftSection, seq_len: int):
    """``(examples, counts)`` of the files under ``path``: every record encoded, then over-long ones truncated
    to ``seq_len`` or dropped (``data.sft.overlong``); ``counts`` = records, truncated, dropped."""
    encoder = SftEncoder(tokenizer, section)
    examples, counts = [], {"records": 0, "truncated": 0, "dropped": 0}
    for file in sft_files(path, field):
        for n, record in enumerate(read_records(file), 1):
            try:
                ids, labels = encoder.encode(record)
            except RecordError as err:
                raise RecordError(f"{file}: record {n}: {err}") from None
            counts["records"] += 1
            if len(ids) > seq_len:
                ids, labels = ids[:seq_len], labels[:seq_len]
                kept = section.overlong == "truncate" and any(t != IGNORE_INDEX for t in labels[1:])
                counts["truncated" if kept else "dropped"] += 1
                if not kept:
                    continue
            examples.append((ids, labels))
    if not examples:
        raise ValueError(f"{field}: no example fits train.seq_len={seq_len} (data.sft.overlong)")
    return examples, counts
