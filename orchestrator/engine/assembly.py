"""Answer assembly: the executor's outcomes go back to the requests that asked, and finished requests become
answers with their usage, cost and timings."""

from __future__ import annotations

from collections import defaultdict

from orchestrator.engine.executor import Outcome
from orchestrator.engine.plan import ExpertWork, LatentWork
from orchestrator.engine.requests import AllExpertsFailed, Answer, ExpertAnswer, InFlight
from routers.aggregation import Aggregated, aggregate_without_call
from routers.vocabulary import Aggregation, Mode
from workers.types import FREE, Price


def record_answers(live: list[InFlight], outcomes: list[tuple[ExpertWork, Outcome]]) -> None:
    """Each row's answer, or its loss, to its request."""
    for work, outcome in outcomes:
        if isinstance(outcome, str):
            for i in work.rows:
                live[i].lost(work.expert, f"{work.expert} failed: {outcome}")
            continue
        for i in work.rows:
            live[i].degraded.extend(outcome.notes)
        for i, c in zip(work.rows, outcome.completions):
            if c.error is not None:  # this row alone failed (a remote server's independent request)
                live[i].lost(work.expert, f"{work.expert} failed: {c.error}")
                continue
            live[i].answered(ExpertAnswer(work.expert, c.text, c.prompt_tokens, c.completion_tokens,
                                          outcome.finished_at, outcome.generate_s, c.cost_usd,
                                          int(c.meta.get("retries", 0)), c.tool_calls))


def record_latent(outcomes: list[tuple[LatentWork, Outcome]]) -> None:
    """The primary's answer to each request; the peers' prompt tokens count in usage."""
    for work, outcome in outcomes:
        if isinstance(outcome, str):
            for p in work.members:
                p.lost(work.primary, f"latent group failed: {outcome}")
            continue
        for p, c in zip(work.members, outcome.completions):
            p.answered(ExpertAnswer(work.primary, c.text, c.prompt_tokens, c.completion_tokens, outcome.finished_at,
                                    outcome.generate_s))
            p.spent.extend(ExpertAnswer(peer, "", n, 0) for peer, n in c.meta.get("peer_tokens", {}).items())


def record_syntheses(live: list[InFlight], outcomes: list[tuple[ExpertWork, Outcome]],
                     results: dict[int, Aggregated]) -> None:
    """Each synthesis to its request; where the aggregator failed, the best answer instead, marked degraded."""
    for work, outcome in outcomes:
        completions = [None] * len(work.rows) if isinstance(outcome, str) else outcome.completions
        for i, c in zip(work.rows, completions):
            if c is None or c.error is not None:
                why = outcome if c is None else c.error
                live[i].degraded.append(f"aggregator {work.expert} failed ({why}); returned the best answer")
                results[i] = aggregate_without_call(Aggregation.BEST, live[i].answers, live[i].decision,
                                                    live[i].request.kind)
            else:
                results[i] = Aggregated(c.text, work.expert, None,
                                        {work.expert: (c.prompt_tokens, c.completion_tokens)})


def finish(live: list[InFlight], results: dict[int, Aggregated], prices: dict[str, Price]) -> None:
    """Resolve every request still waiting: its answer, or AllExpertsFailed with what went wrong."""
    for i, p in enumerate(live):
        if p.future.done():
            continue
        if i in results:
            p.future.set_result(_answer(p, results[i], prices))
        else:
            p.future.set_exception(AllExpertsFailed(
                "every recruited expert failed: " + "; ".join(p.degraded or ["no expert was available"])
            ))


def _answer(p: InFlight, agg: Aggregated, prices: dict[str, Price]) -> Answer:
    """Usage per expert, and cost: a call's reported cost where its backend knew it (a replayed record), else its
    prompt and output tokens at the expert's prices."""
    usage: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    cost_by_expert: dict[str, float] = defaultdict(float)
    calls = [(a.expert, a.prompt_tokens, a.completion_tokens, a.cost_usd) for a in p.spent]
    calls += [(expert, pt, ct, None) for expert, (pt, ct) in agg.usage.items()]
    for expert, pt, ct, reported in calls:
        usage[expert]["prompt_tokens"] += pt
        usage[expert]["completion_tokens"] += ct
        cost_by_expert[expert] += reported if reported is not None else prices.get(expert, FREE).cost(pt, ct)
    aggregation = Mode.LATENT.value if p.decision.latent else p.request.aggregation
    tool_calls = next((a.tool_calls for a in p.answers if a.expert == agg.source), [])
    return Answer(
        text=agg.text, answers=p.answers, aggregation=aggregation, aggregator=agg.aggregator,
        aggregation_skipped=agg.skipped, decision=p.decision, usage=dict(usage), cost_usd=sum(cost_by_expert.values()),
        cost_by_expert=dict(cost_by_expert), timings=p.timings, degraded=p.degraded, answered_by=agg.source,
        asked=[a.expert for a in p.spent if a.finished_at],  # a latent peer's read is no call
        tool_calls=tool_calls,
    )
