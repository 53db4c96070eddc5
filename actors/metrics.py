"""Serving metrics, exported through Ray's Prometheus endpoint (Ray prefixes every name `ray_`).

Speculative-decoding counters use vLLM's names (`spec_decode_num_drafts`,
`spec_decode_num_draft_tokens`, `spec_decode_num_accepted_tokens`) so existing dashboards read
them; CDSL's own figures are `cdsl_*`. Every metric is tagged with the model name and method.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

from cdsl.methods import Generation

LATENCY_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
FRACTION = [0.0001, 0.25, 0.5, 0.75, 0.9999, 1.0]
TAGS = ("model", "method")


class Metrics:
    """The sink a server reports finished requests to."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.drafts = Counter("spec_decode_num_drafts", "Draft proposals verified by the target.", TAGS)
        self.draft_tokens = Counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", TAGS)
        self.accepted_tokens = Counter("spec_decode_num_accepted_tokens", "Draft tokens the target accepted.", TAGS)
        self.rounds = Counter("cdsl_rounds", "CDSL rounds, by state (S1-S4).", (*TAGS, "state"))
        self.reward_calls = Counter("cdsl_reward_calls", "Texts scored by the reward.", TAGS)
        self.tokens = Counter("cdsl_generation_tokens", "Tokens generated.", TAGS)
        self.requests = Counter("cdsl_requests", "Finished requests, by outcome.", (*TAGS, "outcome"))
        self.coverage = Histogram("cdsl_coverage", "Share of the requested concepts the text uses.", FRACTION, TAGS)
        self.latency = Histogram("cdsl_request_latency_seconds", "Request latency, end to end.", LATENCY_S, TAGS)
        self.first_token = Histogram("cdsl_time_to_first_token_seconds", "Time to the first streamed text.",
                                     LATENCY_S, TAGS)

    def _tags(self, method: str) -> dict:
        return {"model": self.model, "method": method}

    def finished(self, method: str, gen: Generation, latency_s: float, coverage: float | None) -> None:
        tags, s = self._tags(method), gen.stats
        if s.drafted:
            self.drafts.inc(max(1, s.rounds), tags)
            self.draft_tokens.inc(s.drafted, tags)
        if s.accepted:  # Ray counters refuse an increment of 0
            self.accepted_tokens.inc(s.accepted, tags)
        for state, n in s.states.items():
            if n:
                self.rounds.inc(n, {**tags, "state": state})
        if s.reward_calls:
            self.reward_calls.inc(s.reward_calls, tags)
        if s.tokens:
            self.tokens.inc(s.tokens, tags)
        if coverage is not None:
            self.coverage.observe(coverage, tags)
        self.latency.observe(latency_s, tags)
        self.outcome(method, "ok")

    def outcome(self, method: str, outcome: str) -> None:
        """Count a request that ended: ok, cancelled or error."""
        self.requests.inc(1, {**self._tags(method), "outcome": outcome})

    def first(self, method: str, seconds: float) -> None:
        self.first_token.observe(seconds, self._tags(method))
