from __future__ import annotations

from pathlib import Path

import pytest

from dexorder.gateway.rag.context import RetrievedChunk
from dexorder.gateway.rag.evaluation import LabelledQuestion, RecallReport, load_questions

QUESTION = LabelledQuestion("How big?", "kb/risk.md", "Fixed Fractional")


def test_a_question_is_answered_by_the_right_passage_of_the_right_document() -> None:
    right = RetrievedChunk("Use fixed fractional sizing.", "kb/risk.md", 0.5)
    wrong_passage = RetrievedChunk("Stops go below swing lows.", "kb/risk.md", 0.9)
    wrong_document = RetrievedChunk("Fixed fractional, quoted.", "kb/other.md", 0.9)
    assert QUESTION.answered_by([wrong_passage, right])
    assert not QUESTION.answered_by([wrong_passage, wrong_document])
    assert not QUESTION.answered_by([])


def test_recall_counts_found_over_total() -> None:
    report = RecallReport(k=5, found=3, missed=["a"])
    assert (report.total, report.recall) == (4, 0.75)
    assert RecallReport(k=5).recall == 0.0


def test_question_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "q.yaml"
    good.write_text("- {question: q, source: s.md, contains: c}\n", encoding="utf-8")
    assert load_questions(good) == [LabelledQuestion("q", "s.md", "c")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {question: q}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="each entry needs question, source and contains"):
        load_questions(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a list"):
        load_questions(empty)
