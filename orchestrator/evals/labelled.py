"""Labelled questions: a question, its gold answer, and optionally a category and a grader kind.

Three forms are read as they are:
- a JSONL file, one ``{"question", "answer", "category"?, "grader"?, "id"?}`` per line (``gold_answer`` or
  ``gold`` may stand for ``answer``);
- a Symbolic-MoE task file, a JSON list of ``{"question", "gold_answer", "category"?}``;
- a bench-data folder (``models.json`` + ``data.jsonl``) whose lines record the gold ``answer``: the question
  is its recorded text, and a lettered gold is graded ``mc``.

A set splits into two halves by a stable hash of each question, within each category, so that one half can
choose the served configuration and the other report on it.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

from routers.scoring.grading import infer_grader
from routers.vocabulary import KIND_OF_GRADER, AnswerKind, Grader
from workers.errors import UserError
from workers.recorded import load_recorded

GOLD_FIELDS = ("answer", "gold_answer", "gold")


class LabelledSetError(UserError, ValueError):
    """A labelled file that is missing, malformed or empty."""


@dataclass
class LabelledSet:
    ids: list[str]
    questions: list[str]
    gold: list[str]
    categories: list[str | None]
    graders: list[Grader]
    source: str

    def __len__(self) -> int:
        return len(self.questions)

    @cached_property
    def kinds(self) -> list[AnswerKind]:
        """The kind of answer each question asks for, as its grader reads answers."""
        return [KIND_OF_GRADER[g] for g in self.graders]

    def subset(self, idx: list[int]) -> LabelledSet:
        return LabelledSet(**{f.name: [getattr(self, f.name)[i] for i in idx] for f in fields(self)
                              if f.name != "source"}, source=self.source)

    def halves(self) -> tuple[list[int], list[int]]:
        """(profile, report): within each category, questions in the order of a hash of their text, alternately
        to one half and the other. Stable across runs and machines."""
        by_category: dict[str | None, list[int]] = defaultdict(list)
        for i, c in enumerate(self.categories):
            by_category[c].append(i)
        first, second = [], []
        for members in by_category.values():
            ordered = sorted(members, key=lambda i: hashlib.sha256(self.questions[i].encode()).hexdigest())
            first += ordered[0::2]
            second += ordered[1::2]
        return sorted(first), sorted(second)


def load_labelled(path: Path, limit: int | None = None) -> LabelledSet:
    if path.is_dir():
        data = _bench_data(path)
    elif path.suffix == ".jsonl":
        data = _rows(_jsonl(path), str(path))
    else:
        data = _rows(_json_list(path), str(path))
    if limit is not None:
        data = data.subset(list(range(min(limit, len(data)))))
    if not len(data):
        raise LabelledSetError(f"{path}: no questions")
    return data


def _jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LabelledSetError(f"cannot read {path}: {exc}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LabelledSetError(f"{path}:{n}: invalid JSON: {exc}") from None
    return rows


def _json_list(path: Path) -> list[dict]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelledSetError(f"cannot read {path}: {exc}") from None
    if not isinstance(items, list):
        raise LabelledSetError(f"{path}: expected a JSON list of {{question, gold_answer}} objects, or a .jsonl file")
    return items


def _rows(rows: list[dict], source: str) -> LabelledSet:
    out = LabelledSet([], [], [], [], [], source)
    for n, row in enumerate(rows, 1):
        where = f"{source}: item {n}"
        gold = next((row[f] for f in GOLD_FIELDS if isinstance(row, dict) and f in row), None)
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or gold is None:
            raise LabelledSetError(f"{where} needs a 'question' and an 'answer'")
        grader = row.get("grader")
        if grader is not None and grader not in {g.value for g in Grader}:
            raise LabelledSetError(f"{where}: unknown grader {grader!r}; choose one of {', '.join(Grader)}")
        out.ids.append(str(row.get("id", n)))
        out.questions.append(row["question"])
        out.gold.append(str(gold))
        out.categories.append(None if row.get("category") is None else str(row["category"]))
        out.graders.append(Grader(grader) if grader else infer_grader(str(gold)))
    return out


def _bench_data(folder: Path) -> LabelledSet:
    recorded = load_recorded(folder)
    if any(r.gold is None for r in recorded.records):
        raise LabelledSetError(f"{folder} records no gold answer for some questions (an 'answer' field): live "
                               "evaluation grades answers against one")
    records = recorded.records
    return LabelledSet([r.id for r in records], [r.text for r in records], [str(r.gold) for r in records],
                       [r.category for r in records], [infer_grader(str(r.gold)) for r in records], str(folder))
