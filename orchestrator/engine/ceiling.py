"""What a request can spend, and the rule that keeps every call within what it may.

A key with a daily budget reserves a request's most before the request runs (``orchestrator.api.tenants``): each
call at its prompt's exact tokens on the expert that reads it plus every token it may generate, priced at the
expert's price. ``plan_most`` counts every call the plan can make: the routed experts, a cascade's escalation,
further moa layers and a synthesis (with answers of the longest length allowed), though the last three happen
only when the first answers disagree. ``first_round_most`` counts the routed experts alone. Either way the
scheduler asks the request's ``Allowance`` before each call, and a call it refuses is not made (a synthesis
falls back to the vote). A call never spends more than its most, so a request never spends more than its
allowance granted.

Prompt tokens are counted by the expert that will read them (``ExpertPool.count_tokens``): an estimate from
words could be short, and a short estimate is an overshoot.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.engine.plan import ExpertWork
from orchestrator.engine.requests import ExpertAnswer, InFlight, QueryRequest, Spend
from routers.aggregation import proposer_prompt, synthesis_request
from routers.base import Decision
from routers.vocabulary import SYNTHESISING, Aggregation
from workers.pool import ExpertPool, reason
from workers.types import FREE, Price, Prompt, SamplingParams

Params = Callable[[QueryRequest, str], SamplingParams]


def call_most(prompt_tokens: int, params: SamplingParams, price: Price) -> Spend:
    """The most one call can cost: its prompt and every token it may generate, at the expert's prices."""
    return Spend(prompt_tokens + params.max_new_tokens, price.cost(prompt_tokens, params.max_new_tokens))


async def first_round_most(pool: ExpertPool, params: Params, prices: dict[str, Price], request: QueryRequest,
                           decision: Decision) -> Spend:
    """The most the first round of a request routed to ``decision`` can spend (a latent request: its primary's
    one call; its peers' reads are not charged)."""
    experts = decision.experts[:1] if decision.latent else decision.experts
    return await _most(pool, params, prices, request, [(e, request.prompt) for e in experts])


async def plan_most(pool: ExpertPool, params: Params, prices: dict[str, Price], request: QueryRequest,
                    decision: Decision, moa_layers: int) -> Spend:
    """The most every call the plan can make can spend, the conditional ones included."""
    if decision.latent:
        return await first_round_most(pool, params, prices, request, decision)
    asked = decision.experts + decision.escalate
    calls: list[tuple[str, str | Prompt]] = [(e, request.prompt) for e in asked]
    longest = [ExpertAnswer(e, " ".join(["answer"] * params(request, e).max_new_tokens), 0, 0) for e in asked]
    if request.aggregation == Aggregation.MOA:
        again = proposer_prompt(request.query, [a.text for a in longest])
        calls += [(e, again) for _ in range(moa_layers - 1) for e in decision.experts]
    if request.aggregation in SYNTHESISING and len(asked) > 1:
        calls.append(synthesis_request(request.query, longest, decision, pool.healthy()))
    return await _most(pool, params, prices, request, calls)


async def _most(pool: ExpertPool, params: Params, prices: dict[str, Price], request: QueryRequest,
                calls: list[tuple[str, str | Prompt]]) -> Spend:
    total = Spend()
    for expert in dict.fromkeys(e for e, _ in calls):
        prompts = [prompt for e, prompt in calls if e == expert]
        for n in await pool.count_tokens(expert, prompts):
            total += call_most(n, params(request, expert), prices.get(expert, FREE))
    return total


async def hold_to_allowances(pool: ExpertPool, prices: dict[str, Price], live: list[InFlight],
                             works: list[ExpertWork]) -> tuple[list[ExpertWork], set[int]]:
    """The works without the rows whose request's allowance refuses the call, and those rows. Requests without
    an allowance are not counted (no extra call)."""
    dropped: set[int] = set()
    for work in [w for w in works if any(live[i].request.allowance is not None for i in w.rows)]:
        positions = [n for n, i in enumerate(work.rows) if live[i].request.allowance is not None]
        try:
            counts: list[int | None] = list(await pool.count_tokens(work.expert, [work.prompts[n] for n in positions]))
        except Exception as exc:  # noqa: BLE001  (an expert that cannot count cannot be held to an allowance)
            counts, why = [None] * len(positions), reason(exc)
        refused = set()
        for n, prompt_tokens in zip(positions, counts):
            p = live[work.rows[n]]
            if prompt_tokens is None:
                note = f"{work.expert} was not asked: its prompt could not be counted against the budget ({why})"
            else:
                most = call_most(prompt_tokens, work.params, prices.get(work.expert, FREE))
                if await p.request.allowance.take(most):
                    continue
                note = (f"{work.expert} was not asked: its call could cost up to {most.tokens:g} tokens "
                        f"(${most.usd:.6f}), more than the key's budget allows now")
            refused.add(n)
            dropped.add(work.rows[n])
            p.degraded.append(note)
        _drop_positions(work, refused)
    return [w for w in works if w.rows], dropped


def _drop_positions(work: ExpertWork, positions: set[int]) -> None:
    if not positions:
        return
    kept = [n for n in range(len(work.rows)) if n not in positions]
    work.streams = {kept.index(n): s for n, s in work.streams.items() if n in kept}
    work.rows = [work.rows[n] for n in kept]
    work.prompts = [work.prompts[n] for n in kept]

