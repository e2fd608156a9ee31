"""Recorded outcomes in the bench-data format: ``models.json`` + ``data.jsonl`` (+ ``prices.json``).

Each line holds one query and, per model (in ``models.json`` order), whether it
was right, and where recorded, its extracted answer, its cost, and the length
of its output. Where a folder has ``prices.json`` (USD per 1M input and output
tokens) and the lines record output lengths, each call's cost follows the
data's own rule: (prompt_chars / 4 × input + output_chars / 4 × output) / 1e6,
where prompt_chars is the length of the question plus its options. Both the
replay backend and offline router evaluation read this format, so one reader
serves both and validates a file once, with errors that name line and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.errors import UserError
from workers.types import CHARS_PER_TOKEN

ID_FIELDS = ("question_id", "sample_id", "id")
TEXT_FIELDS = ("question", "query")
OUTCOME_FIELDS = ("correct", "score")
CATEGORY_FIELDS = ("category", "eval_name")


class RecordedDataError(UserError, ValueError):
    """A bench-data folder that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    category: str | None
    outcome: tuple[float, ...]
    pred: tuple[str | None, ...] | None
    """Each model's extracted answer; None where the recording extracted none."""
    cost: tuple[float, ...] | None
    output_chars: tuple[float, ...] | None = None
    prompt_chars: int = 0
    gold: str | None = None
    """The gold answer, where the line records one (``answer``)."""


@dataclass(frozen=True)
class RecordedOutcomes:
    models: tuple[str, ...]
    records: tuple[Record, ...]
    prices: tuple[tuple[float, float], ...] | None = None
    """USD per input and output token of each model, where the folder has prices.json."""

    def model_index(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise RecordedDataError(
                f"model {model!r} is not in this file; it has: {', '.join(self.models)}"
            ) from None


def _first(row: dict, fields: tuple[str, ...], where: str, required: bool = True) -> object:
    for name in fields:
        if name in row:
            return row[name]
    if required:
        raise RecordedDataError(f"{where}: missing field (one of {', '.join(fields)})")
    return None


def _per_model(value: object, n: int, field: str, where: str, kind: type, nullable: bool = False) -> tuple:
    if not isinstance(value, list) or len(value) != n:
        raise RecordedDataError(f"{where}: {field!r} must be a list of {n} values, one per model")
    try:
        return tuple(None if nullable and v is None else kind(v) for v in value)
    except (TypeError, ValueError):
        raise RecordedDataError(f"{where}: {field!r} holds a value that is not {kind.__name__}") from None


def load_recorded(folder: str | Path) -> RecordedOutcomes:
    folder = Path(folder)
    models_path, data_path = folder / "models.json", folder / "data.jsonl"
    for path in (models_path, data_path):
        if not path.exists():
            raise RecordedDataError(f"{folder} is not a bench-data folder: {path.name} is missing")
    try:
        models = json.loads(models_path.read_text())
    except json.JSONDecodeError as exc:
        raise RecordedDataError(f"{models_path}: invalid JSON: {exc}") from None
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise RecordedDataError(f"{models_path}: must be a non-empty list of model names")
    prices = _prices(folder / "prices.json", models)
    with data_path.open(encoding="utf-8") as fh:
        records = [_record(line, f"{data_path}:{n}", len(models), prices)
                   for n, line in enumerate(fh, 1) if line.strip()]
    if not records:
        raise RecordedDataError(f"{data_path} holds no records")
    return RecordedOutcomes(models=tuple(models), records=tuple(records), prices=prices)


def _record(line: str, where: str, n: int, prices: tuple[tuple[float, float], ...] | None) -> Record:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordedDataError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(row, dict):
        raise RecordedDataError(f"{where}: each line must be a JSON object")
    outcome_field = next((f for f in OUTCOME_FIELDS if f in row), OUTCOME_FIELDS[0])
    outcome = _per_model(_first(row, OUTCOME_FIELDS, where), n, outcome_field, where, float)
    text = str(_first(row, TEXT_FIELDS, where))
    pred, cost, chars = row.get("pred"), row.get("cost_usd"), row.get("output_chars")
    category = _first(row, CATEGORY_FIELDS, where, required=False)
    output = None if chars is None else _per_model(chars, n, "output_chars", where, float)
    prompt_chars = len(text) + sum(len(str(o)) for o in row.get("options") or [])
    if cost is not None:
        cost = _per_model(cost, n, "cost_usd", where, float)
    elif prices is not None and output is not None:
        cost = tuple((prompt_chars / CHARS_PER_TOKEN * i + o / CHARS_PER_TOKEN * u)
                     for (i, u), o in zip(prices, output))
    return Record(
        id=str(_first(row, ID_FIELDS, where)), text=text, category=None if category is None else str(category),
        outcome=outcome, pred=None if pred is None else _per_model(pred, n, "pred", where, str, nullable=True),
        cost=cost, output_chars=output, prompt_chars=prompt_chars,
        gold=None if row.get("answer") is None else str(row["answer"]),
    )


def _prices(path: Path, models: list[str]) -> tuple[tuple[float, float], ...] | None:
    """USD per token (input, output) per model, from a prices.json of USD per 1M tokens; None without one."""
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())["models"]
        return tuple((float(table[m]["input"]) / 1e6, float(table[m]["output"]) / 1e6) for m in models)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RecordedDataError(f"{path}: needs a price (input, output) for every model: {exc!r}") from None
