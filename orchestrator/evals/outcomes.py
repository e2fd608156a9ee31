"""The outcomes a router learns from in a live evaluation: the experts' own answers, graded.

For labelled questions the experts answered live, each expert alone is asked every question, and its graded
answers become a training set of the same shape as recorded outcomes: right or wrong, the answer as the vote
compares it, its cost, its length and the expert's price. For a bench-data folder served by replay experts the
recorded outcomes are those answers already, so the routers are fitted on exactly what offline evaluation fits
them on.
"""

from __future__ import annotations

import numpy as np

from orchestrator.evals.labelled import LabelledSet
from orchestrator.evals.live import Row
from routers.answers import extract
from routers.base import Prices
from routers.embedding import TextEncoder
from routers.scoring.crossval import EvalData
from workers.types import Price


def from_answers(data: LabelledSet, alone: dict[str, Row], prices: dict[str, Price],
                 encoder: TextEncoder) -> EvalData:
    """``alone``: each expert's row of answers to every question; ``prices``: each expert's prices."""
    experts = list(alone)
    results = [[alone[e].results[i] for e in experts] for i in range(len(data))]
    kinds = data.kinds
    price_in, price_out = (np.array([getattr(prices[e], side) for e in experts]) for side in ("input", "output"))
    return EvalData(
        texts=list(data.questions), experts=experts, categories=list(data.categories),
        correct=np.array([[float(r.correct) for r in row] for row in results]),
        cost=np.array([[r.cost for r in row] for row in results]),
        answers=np.array([[extract(r.text, kinds[i]) for r in row] for i, row in enumerate(results)], dtype=object),
        output_tokens=np.array([[float(r.completion_tokens) for r in row] for row in results]),
        prices=Prices(price_in, price_out), vectors=encoder.encode(list(data.questions)),
    )
