"""Retrieval quality on a labelled question set: recall@k.

A labelled question names the document that answers it and a phrase from the passage
holding the answer. It counts as found when one of the retrieved chunks comes from that
document and contains that phrase (case-insensitively): the right passage, not merely
the right file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dexorder.gateway.rag.context import RetrievedChunk
from dexorder.gateway.rag.retriever import Retriever


@dataclass(frozen=True)
class LabelledQuestion:
    question: str
    source: str
    contains: str

    def answered_by(self, chunks: Sequence[RetrievedChunk]) -> bool:
        phrase = self.contains.lower()
        return any(c.source == self.source and phrase in c.text.lower() for c in chunks)


@dataclass
class RecallReport:
    k: int
    found: int = 0
    missed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.found + len(self.missed)

    @property
    def recall(self) -> float:
        return self.found / self.total if self.total else 0.0


def load_questions(path: Path) -> list[LabelledQuestion]:
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a list of questions")
    try:
        return [
            LabelledQuestion(str(e["question"]), str(e["source"]), str(e["contains"]))
            for e in entries
        ]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: each entry needs question, source and contains") from error


async def recall_at_k(
    retriever: Retriever, user_id: str, questions: Sequence[LabelledQuestion]
) -> RecallReport:
    """recall@k, k being the retriever's top_k; its score threshold applies too."""
    report = RecallReport(k=retriever.top_k)
    for labelled in questions:
        chunks = await retriever.search(user_id, labelled.question)
        if labelled.answered_by(chunks):
            report.found += 1
        else:
            report.missed.append(labelled.question)
    return report
