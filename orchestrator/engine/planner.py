"""The planner: turns a window's routing decisions into per-expert work, and decides nothing about when it runs.

It settles each decision (the allow-list, who synthesises, the budget), derives
every call's sampling settings, and groups the (request, expert) pairs of a
phase into one ``ExpertWork`` per expert and settings, so that each expert gets
one batched call per phase. It reads the pool's state (names, health, configs)
and never calls an expert.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from orchestrator.engine.plan import ExpertWork, LatentWork
from orchestrator.engine.requests import InFlight, QueryRequest
from orchestrator.engine.settings import TOP_SCORED, SchedulerSettings
from routers.aggregation import Aggregated, aggregate_without_call, proposer_prompt, synthesis_request
from routers.answers import extract
from routers.base import Decision, RouteOptions, pick
from routers.plans import agree
from routers.vocabulary import SYNTHESISING, Aggregation
from workers.pool import ExpertPool
from workers.types import FREE, Price, Prompt, SamplingParams

AGGREGATOR = "aggregator"
"""``InFlight.streams_from`` for a request whose answer the synthesis call writes."""
LATENT_SKIPPED = "latent mode: the peers took part inside the primary's forward pass, so there are no answers to merge"


class Planner:
    def __init__(self, pool: ExpertPool, settings: SchedulerSettings, prices: dict[str, Price]) -> None:
        self.pool, self.settings, self.prices = pool, settings, prices

    def params(self, request: QueryRequest, expert: str) -> SamplingParams:
        """The expert's generation defaults with the request's overrides. self-moa samples: greedy samples
        from one model would all be the same answer."""
        gen = self.pool.config_of(expert).generation
        temperature = request.temperature
        if request.aggregation == Aggregation.SELF_MOA and temperature is None:
            temperature = max(gen.temperature, self.settings.self_moa_temperature)
        return gen.sampling(request.max_new_tokens, temperature, request.top_p, request.seed, request.stop)

    def stream_plan(self, p: InFlight) -> dict[str, object]:
        """Which row writes a streaming request's answer, so that its tokens can go out as they are written."""
        d, aggregation = p.decision, p.request.aggregation
        if d.latent:
            p.streams_from, why = d.experts[0], "the latent primary writes the answer"
        elif d.escalate:
            why = "a cascade may ask again: the answer is the vote of every round, sent when it is done"
        elif aggregation == Aggregation.BEST or len(d.experts) == 1:
            p.streams_from = max(d.experts, key=lambda e: d.scores.get(e, 0.0))
            why = "the top-scored expert's answer is the answer"
        elif aggregation in SYNTHESISING:
            p.streams_from = AGGREGATOR
            why = "the aggregator's synthesis is the answer (sent whole if the experts agree and it is skipped)"
        else:
            why = "a vote needs every answer first: the answer is sent when the vote is done"
        return {"streams": p.streams_from, "why": why, "router": d.trace.get("router"), "experts": d.experts}

    # -- decisions --------------------------------------------------------------------------------------

    def settle(self, p: InFlight, decision: Decision, options: RouteOptions) -> None:
        """The request's final decision: the allow-list applied, then, unless the latent mixture answers
        alone with its peers, the aggregator fixed and the budget fitted."""
        p.decision = self._restrict(decision, p.request, options)
        if not p.decision.latent:
            self._choose_aggregator(p)
            self._fit_cost_cap(p)

    def _restrict(self, decision: Decision, request: QueryRequest, options: RouteOptions) -> Decision:
        """Apply the request's allow-list by re-picking among allowed experts with the router's scores."""
        if request.experts is None:
            return decision
        # The latent router can only choose among its mixture's experts (its scores' keys).
        candidates = list(decision.scores) if decision.latent else self.pool.names
        allowed = [e for e in candidates if e in request.experts]
        scores = np.array([decision.scores.get(e, 0.0) for e in allowed])
        # The latent mixture needs distinct experts, its best first, whatever sampling policy is configured.
        policy = RouteOptions(k=options.k) if decision.latent else options
        chosen = pick(scores, policy, None, np.random.default_rng(options.seed))
        decision.experts = [allowed[i] for i in chosen]
        if decision.aggregator not in allowed:
            decision.aggregator = allowed[int(np.argmax(scores))]
        decision.trace["allow_list"] = allowed
        if decision.latent:
            decision.trace.update(primary=decision.experts[0], peers=decision.experts[1:])
        return decision

    def _choose_aggregator(self, p: InFlight) -> None:
        """Fix who samples (self-moa) and who synthesises, and say why in the trace."""
        d = p.decision
        allowed = p.request.experts or self.pool.names
        if p.request.aggregation == Aggregation.SELF_MOA:
            best = max(allowed, key=lambda e: d.scores.get(e, 0.0))
            d.experts = [best] * p.request.options.k
            d.aggregator = best
            d.trace["aggregator_choice"] = "self-moa: the sampled expert synthesises its own samples"
            return
        preferred = next((e for e in self.settings.aggregators if e in allowed), None)
        if preferred is not None:
            d.aggregator = preferred
            d.trace["aggregator_choice"] = self.settings.aggregator_source
        else:
            d.trace["aggregator_choice"] = TOP_SCORED

    def _fit_cost_cap(self, p: InFlight) -> None:
        """Drop the costliest recruits until the estimated cost fits the request's cost cap (the API's ``budget``);
        one always stays.

        The estimate is the prompt's words (a token count needs the expert's tokenizer, which lives in the worker)
        at the expert's input price, plus the tokens it may generate at its output price.
        """
        r, d = p.request, p.decision
        if r.max_cost_usd is None:
            return
        words = len(r.query.split())

        def cost(e: str) -> float:
            return self.prices.get(e, FREE).cost(words, self.params(r, e).max_new_tokens)

        dropped = []
        if d.escalate and sum(cost(e) for e in d.experts + d.escalate) > r.max_cost_usd:
            dropped, d.escalate = list(d.escalate), []  # a cascade's second round goes first
        while len(d.experts) > 1 and sum(cost(e) for e in d.experts) > r.max_cost_usd:
            costliest = max(d.experts, key=cost)
            d.experts.remove(costliest)
            dropped.append(costliest)
        d.trace["budget"] = {"usd": r.max_cost_usd, "estimate_usd": round(sum(cost(e) for e in d.experts), 8),
                             "dropped": dropped}

    # -- work -------------------------------------------------------------------------------------------

    def solve(self, live: list[InFlight], assignment: dict[int, list[str]],
              prompt_of: Callable[[int], str | Prompt], stream: bool = False) -> list[ExpertWork]:
        """One call per (expert, settings) over the assigned rows; duplicates from sampling with replacement
        are extra rows of the same call. With ``stream``, the row that writes a streaming request's answer
        streams to it."""
        groups: dict[tuple[str, SamplingParams], list[int]] = defaultdict(list)
        for i, experts in assignment.items():
            for expert in experts:
                groups[(expert, self.params(live[i].request, expert))].append(i)
        work = [ExpertWork(expert, params, rows, [prompt_of(i) for i in rows])
                for (expert, params), rows in groups.items()]
        if stream:
            _attach(live, work, lambda p, w: p.streams_from == w.expert)
        return work

    def first_layer(self, live: list[InFlight]) -> list[ExpertWork]:
        assignment = {i: p.decision.experts for i, p in enumerate(live) if not p.decision.latent}
        return self.solve(live, assignment, lambda i: live[i].request.prompt, stream=True)

    def reroutes(self, live: list[InFlight]) -> list[ExpertWork]:
        """A request that lost every expert goes to its next-ranked healthy expert, marked degraded."""
        healthy = self.pool.healthy()
        assignment = {}
        for i, p in enumerate(live):
            if p.answers or p.decision.latent:
                continue
            allowed = p.request.experts or self.pool.names
            ranked = sorted(p.decision.scores, key=lambda e: -p.decision.scores[e])
            spare = next((e for e in ranked if e in allowed and healthy.get(e) and e not in p.failed), None)
            if spare is not None:
                p.degraded.append(f"re-routed to {spare} after {', '.join(sorted(set(p.failed)))} failed")
                assignment[i] = [spare]
        return self.solve(live, assignment, lambda i: live[i].request.prompt)

    def escalations(self, live: list[InFlight]) -> list[ExpertWork]:
        """A cascade's second round: its escalation experts, for the requests whose first answers disagree.
        Every cascade's trace records its rounds, or why it stopped after the first."""
        assignment = {}
        for i, p in enumerate(live):
            d = p.decision
            if d.latent or not d.escalate:
                continue
            first = list(d.experts)
            kind = p.request.kind
            if agree([extract(a.text, kind) for a in p.answers]):
                d.trace["rounds"] = [first]
                d.trace["stopped"] = "the first round's answers agree"
            else:
                assignment[i] = list(d.escalate)
                d.trace["rounds"] = [first, list(d.escalate)]
        return self.solve(live, assignment, lambda i: live[i].request.prompt)

    def latent(self, live: list[InFlight]) -> list[LatentWork]:
        """One latent-group call per (primary, settings)."""
        groups: dict[tuple[str, SamplingParams], list[InFlight]] = defaultdict(list)
        for p in live:
            if p.decision.latent:
                primary = p.decision.experts[0]
                groups[(primary, self.params(p.request, primary))].append(p)
        return [LatentWork(primary, params, members) for (primary, params), members in groups.items()]

    def moa_layer(self, live: list[InFlight]) -> tuple[dict[int, list[str]], list[ExpertWork]]:
        """The next moa proposer layer: each proposer answers again with the previous layer's answers as
        references. Returns the rows' previous proposers and the work."""
        rows = {i: [a.expert for a in p.answers] for i, p in enumerate(live)
                if p.request.aggregation == Aggregation.MOA and p.answers and not p.decision.latent}
        prompts = {i: proposer_prompt(live[i].request.query, [a.text for a in live[i].answers]) for i in rows}
        return rows, self.solve(live, rows, prompts.__getitem__)

    def aggregation(self, live: list[InFlight]) -> tuple[dict[int, Aggregated], list[ExpertWork]]:
        """The requests that need no aggregator call, aggregated now; the synthesis calls for the others,
        grouped by aggregator."""
        done: dict[int, Aggregated] = {}
        calls: dict[tuple[str, SamplingParams], list[tuple[int, str]]] = defaultdict(list)
        healthy = self.pool.healthy()
        for i, p in enumerate(live):
            if not p.answers:
                continue
            if p.decision.latent:
                done[i] = Aggregated(p.answers[0].text, p.answers[0].expert, LATENT_SKIPPED)
                continue
            p.answers.sort(key=_rank(p.decision))
            result = aggregate_without_call(p.request.aggregation, p.answers, p.decision, p.request.kind)
            if result is not None:
                done[i] = result
            else:
                aggregator, prompt = synthesis_request(p.request.query, p.answers, p.decision, healthy)
                calls[(aggregator, self.params(p.request, aggregator))].append((i, prompt))
        work = [ExpertWork(aggregator, params, [i for i, _ in items], [prompt for _, prompt in items])
                for (aggregator, params), items in calls.items()]
        _attach(live, work, lambda p, _w: p.streams_from == AGGREGATOR)
        return done, work


def _rank(decision: Decision) -> Callable[[object], int]:
    """An answer's place in the decision's order (its experts, then a cascade's escalation): answers arrive in the
    order their calls finish, and a vote's tie must go the same way every time, live as offline."""
    order = {}
    for position, expert in enumerate(decision.experts + decision.escalate):
        order.setdefault(expert, position)
    return lambda answer: order.get(answer.expert, len(order))


def _attach(live: list[InFlight], work: list[ExpertWork], writes: Callable[[InFlight, ExpertWork], bool]) -> None:
    """Point each streaming request at the one row that writes its answer: the first of its rows in a call whose
    expert ``writes`` it."""
    attached: set[int] = set()
    for w in work:
        for position, i in enumerate(w.rows):
            stream = live[i].request.stream
            if stream is not None and i not in attached and writes(live[i], w):
                w.streams[position] = stream
                attached.add(i)
