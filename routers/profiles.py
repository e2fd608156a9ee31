"""Expert profiles: how each expert does on each skill, as in Symbolic-MoE, plus a smoothed estimate.

The paper's profile is a raw count: +1 for each right answer on a question
that needs the skill, −1 for each wrong one. Raw counts rank rarely seen
skills by luck, so profiles also keep the counts behind them. The smoothed
per-skill accuracy shrinks each skill towards the expert's overall accuracy,
like a Beta prior worth ``prior`` questions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from workers.errors import UserError

PROFILE_VERSION = 1
T = TypeVar("T")


class ProfileError(UserError, ValueError):
    """Profiles that cannot be built or read."""


def read_artifact(path: Path, read: Callable[[Path], T]) -> T:
    """Read one artifact file; a missing or corrupt file is a ProfileError that names it."""
    if not path.exists():
        raise ProfileError(f"profile file {path} is missing: rebuild with `concilium profile`")
    try:
        return read(path)
    except Exception as exc:  # any parser's error: the file is corrupt, whatever the format
        raise ProfileError(f"profile file {path} is corrupt ({type(exc).__name__}: {exc}): "
                           "rebuild with `concilium profile`") from None


@dataclass
class Profiles:
    experts: list[str]
    skills: list[str]
    right: np.ndarray
    """[skills, experts]: right answers on questions tagged with the skill."""
    seen: np.ndarray
    """[skills, experts]: questions tagged with the skill that the expert answered."""
    overall: np.ndarray
    """[experts]: accuracy over all profiling questions, each counted once."""
    cost: np.ndarray | None = None
    """[experts]: mean cost per query, where recorded."""

    @property
    def score(self) -> np.ndarray:
        """The paper's profile values: (+1 right, −1 wrong) summed per skill."""
        return 2 * self.right - self.seen

    def global_strength(self, temperature: float = 0.5) -> np.ndarray:
        """Paper: s = Σ_skills score. If min(s) < 0, use s − min + 1. Then s^(1/T), normalised."""
        s = self.score.sum(axis=0).astype(np.float64)
        if s.min() < 0:
            s = s - s.min() + 1
        s = np.power(s, 1.0 / temperature)
        total = s.sum()
        return s / total if total > 0 else np.full_like(s, 1.0 / len(s))

    def smoothed_accuracy(self, prior: float = 4.0) -> np.ndarray:
        """[skills, experts] posterior-mean accuracy with the expert's overall accuracy as prior."""
        return (self.right + prior * self.overall[None, :]) / (self.seen + prior)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "profiles.npz",
            right=self.right, seen=self.seen, overall=self.overall,
            cost=self.cost if self.cost is not None else np.zeros(0),
        )
        meta = {"version": PROFILE_VERSION, "experts": self.experts, "skills": self.skills,
                "has_cost": self.cost is not None}
        (folder / "profiles.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> Profiles:
        meta_path, arr_path = folder / "profiles.json", folder / "profiles.npz"
        meta = read_artifact(meta_path, lambda p: json.loads(p.read_text()))
        if not isinstance(meta, dict) or meta.get("version") != PROFILE_VERSION:
            version = meta.get("version") if isinstance(meta, dict) else None
            raise ProfileError(f"{meta_path}: version {version}, expected {PROFILE_VERSION}")

        def arrays_of(path: Path) -> dict[str, np.ndarray]:
            with np.load(path) as npz:
                return {k: npz[k] for k in npz.files}

        arrays = read_artifact(arr_path, arrays_of)
        try:
            return cls(
                experts=meta["experts"], skills=meta["skills"], right=arrays["right"], seen=arrays["seen"],
                overall=arrays["overall"], cost=arrays["cost"] if meta["has_cost"] else None,
            )
        except KeyError as exc:
            raise ProfileError(f"{meta_path} or {arr_path} lacks {exc}: rebuild with `concilium profile`") from None


def build_profiles(
    keywords: list[list[str]],
    correct: np.ndarray,
    experts: list[str],
    cost: np.ndarray | None = None,
) -> Profiles:
    """Profiles from per-question keywords and a [questions, experts] 0/1 correctness matrix."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or correct.shape != (len(keywords), len(experts)):
        raise ProfileError(
            f"correctness must be [{len(keywords)} questions, {len(experts)} experts], got {correct.shape}"
        )
    if len(keywords) == 0:
        raise ProfileError("no profiling questions: the validation set is empty")
    index: dict[str, int] = {}
    rows, cols = [], []
    for q, kws in enumerate(keywords):
        for kw in dict.fromkeys(kws):
            rows.append(index.setdefault(kw, len(index)))
            cols.append(q)
    tags = np.zeros((len(index), len(keywords)))
    tags[rows, cols] = 1.0
    return Profiles(
        experts=list(experts),
        skills=list(index),
        right=tags @ correct,
        seen=np.repeat(tags.sum(axis=1, keepdims=True), len(experts), axis=1),
        overall=correct.mean(axis=0),
        cost=None if cost is None else np.asarray(cost, dtype=np.float64).mean(axis=0),
    )
