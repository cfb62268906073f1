"""A rollout of an alias, as pure logic: its state machine, the traffic split, and the live gate.

A rollout moves a tenant's alias from its current immutable reference to a candidate in steps
(e.g. 10%, 50%, 100% of the alias's requests), behind gates:

    pending-eval --eval passed--> canary(step 0) --advance--> canary(step 1) ... --advance--> promoted
         |                          |   ^                                            (alias = candidate)
         |                  pause   v   | resume
         |                        paused
         +--eval failed--> rolled-back  <--live gate failed-- canary / paused
         |                 rolled-back  <--step's eval failed-- canary (a scheduled or commanded advance)
         +--abort-->       aborted      <--abort--            canary / paused

`promoted`, `rolled-back` and `aborted` are final; only `canary` and `paused` route any traffic to
the candidate (a paused rollout keeps its step's split but does not advance). Advancing from the last
step promotes: the alias itself moves to the candidate, in the same transaction that ends the rollout.
A rollout with an `interval_s` advances on its own (rollout_schedule.py) once its step has lasted that
long, its live gates pass with the minimum sample and its evaluation gate passes again.

The split: a request with a stable caller key (the OpenAI `user` field, else the
`X-AdapterHub-Caller` header) goes to the candidate when sha256(rollout id, caller) falls in the
first `percent` of [0, 100), so one caller sees one version within a step (and, the buckets being
fixed, stays on the candidate as its share grows). A request without a key is split at random.
Nothing here touches a database or the network (see rollout_store.py and rollout_router.py).
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
import re
import time
from collections import deque
from dataclasses import dataclass, replace

from adapterhub_lite.errors import ErrorKind, ServingError

CALLER_HEADER = b"x-adapterhub-caller"
ANSWERED_BY_HEADER = b"x-adapterhub-adapter"
MAX_CALLER_CHARS = 256  # a caller key longer than this is hashed as its prefix (bounded work per request)
DEFAULT_STEPS = (10, 50, 100)
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 7 * 86400.0
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


class State(enum.StrEnum):
    PENDING_EVAL = "pending-eval"
    CANARY = "canary"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled-back"
    ABORTED = "aborted"


ACTIVE = frozenset({State.PENDING_EVAL, State.CANARY, State.PAUSED})
ROUTING = frozenset({State.CANARY, State.PAUSED})


def _refused(message: str, hint: str | None = None) -> ServingError:
    return ServingError(message, hint, kind=ErrorKind.CONFLICT)


def parse_steps(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Steps as percentages of the alias's traffic, strictly increasing, each in 1..100.

    "10,50,100" -> (10, 50, 100). A last step under 100 is allowed: advancing past it promotes."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(re.fullmatch(r"[0-9]{1,3}", p) for p in parts):
            raise ServingError(
                f"invalid steps {text!r}",
                hint="give percentages separated by commas, e.g. --steps 10,50,100",
                kind=ErrorKind.INVALID,
            )
        steps = tuple(int(p) for p in parts)
    else:
        steps = tuple(int(p) for p in text)
    if not steps or len(steps) > 20:
        raise ServingError(
            "a rollout needs 1 to 20 steps", hint="e.g. --steps 10,50,100", kind=ErrorKind.INVALID
        )
    if any(s < 1 or s > 100 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ServingError(
            f"invalid steps {','.join(map(str, steps))}: each must be 1..100 and larger than the one before",
            hint="e.g. --steps 10,50,100",
            kind=ErrorKind.INVALID,
        )
    return steps


def parse_interval(text: str | float | None) -> float | None:
    """A step's length in seconds: "90", "30s", "5m", "1h" (None: steps advance only by command)."""
    if text is None or text == "":
        return None
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]{1,7}(?:\.[0-9]{1,3})?)\s*([smh]?)\s*", text)
        if m is None:
            raise ServingError(
                f"invalid interval {text!r}",
                hint="give a step's length as seconds, or with a unit: 30s, 5m, 1h",
                kind=ErrorKind.INVALID,
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not (MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S):
        raise ServingError(
            f"invalid interval {text!r}: a step lasts {MIN_INTERVAL_S:g} s to 7 days",
            hint="e.g. --interval 5m",
            kind=ErrorKind.INVALID,
        )
    return seconds


@dataclass(frozen=True)
class Rollout:
    """One rollout of `tenant`'s `alias` from `current` to `candidate`."""

    id: int
    tenant: str
    alias: str
    current: str
    candidate: str
    steps: tuple[int, ...]
    step: int  # index into steps
    state: State
    margin: float  # how much worse (exact match, absolute) the candidate may be on the eval set
    created: float
    updated: float
    interval_s: float | None = None  # a step's length when steps advance on a schedule, else None
    step_started: float = 0.0  # when the current step began (or resumed)

    @property
    def percent(self) -> int:
        """The candidate's share of the alias's traffic now (0 when it takes none)."""
        return self.steps[self.step] if self.state in ROUTING else 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def due(self, now: float | None = None) -> bool:
        """Whether the schedule wants the next step now (the gates still decide whether it happens)."""
        if self.state is not State.CANARY or self.interval_s is None:
            return False
        return (now if now is not None else time.time()) - self.step_started >= self.interval_s

    # -- transitions: each returns the rollout after it, or raises CONFLICT ------------------------

    def _need(self, action: str, *states: State) -> None:
        if self.state not in states:
            raise _refused(
                f"cannot {action} rollout {self.id} of {self.tenant}/{self.alias}: it is {self.state.value}",
                hint="see `adapterhub tenant rollout status TENANT ALIAS`",
            )

    def eval_passed(self, now: float | None = None) -> Rollout:
        self._need("start traffic on", State.PENDING_EVAL)
        now = now or time.time()
        return replace(self, state=State.CANARY, step=0, updated=now, step_started=now)

    def eval_failed(self, now: float | None = None) -> Rollout:
        self._need("refuse", State.PENDING_EVAL)
        return replace(self, state=State.ROLLED_BACK, updated=now or time.time())

    def advance(self, now: float | None = None) -> Rollout:
        """The next step, or `promoted` after the last one."""
        self._need("advance", State.CANARY)
        now = now or time.time()
        if self.step + 1 < len(self.steps):
            return replace(self, step=self.step + 1, updated=now, step_started=now)
        return replace(self, state=State.PROMOTED, updated=now)

    def pause(self, now: float | None = None) -> Rollout:
        self._need("pause", State.CANARY)
        return replace(self, state=State.PAUSED, updated=now or time.time())

    def resume(self, now: float | None = None) -> Rollout:
        self._need("resume", State.PAUSED)
        now = now or time.time()  # a resumed step is watched for a whole interval again
        return replace(self, state=State.CANARY, updated=now, step_started=now)

    def abort(self, now: float | None = None) -> Rollout:
        self._need("abort", *ACTIVE)
        return replace(self, state=State.ABORTED, updated=now or time.time())

    def roll_back(self, now: float | None = None) -> Rollout:
        self._need("roll back", State.CANARY, State.PAUSED)
        return replace(self, state=State.ROLLED_BACK, updated=now or time.time())


def bucket(rollout_id: int, caller: str) -> float:
    """Where `caller` falls in [0, 100) for this rollout: uniform over callers, fixed per caller."""
    digest = hashlib.sha256(f"{rollout_id}\x00{caller[:MAX_CALLER_CHARS]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def choose(rollout: Rollout, caller: str | None, rng: random.Random | None = None) -> str:
    """The reference that answers one request of the alias under `rollout`."""
    percent = rollout.percent
    if percent <= 0:
        return rollout.current
    if percent >= 100:
        return rollout.candidate
    point = bucket(rollout.id, caller) if caller else (rng or random).random() * 100.0
    return rollout.candidate if point < percent else rollout.current


def caller_key(payload: dict, headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's stable caller key: the OpenAI `user` field, else the X-AdapterHub-Caller header."""
    user = payload.get("user")
    if isinstance(user, str) and user:
        return user
    for name, value in headers:
        if name.lower() == CALLER_HEADER and value:
            return value.decode("latin-1")
    return None


# -- the live gate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSettings:
    """When the live gates fail a candidate, over the last `window_s` seconds:
    - failures, once the candidate has answered `min_sample` requests: its failure rate (5xx, empty
      or non-finite answers) exceeds the current version's by more than `max_increase` (absolute);
    - latency, once both versions have answered `latency_min_sample` requests: the candidate's p95
      exceeds `p95_margin` times the current version's p95 plus `p95_slack_s` (the slack keeps
      millisecond jitter of a fast version from failing its twin). The sample is larger because a
      version's first request also loads its adapter: by nearest rank, the p95 of 20 answers is the
      second slowest, so that one cold load alone cannot fail a candidate.
    A scheduled advance also needs `min_sample` candidate answers in the step's window."""

    window_s: float = 60.0
    min_sample: int = 10
    max_increase: float = 0.05
    latency_min_sample: int = 20
    p95_margin: float = 1.5
    p95_slack_s: float = 0.05


def p95(values: list[float]) -> float:
    """The 95th percentile by nearest rank: the smallest value with at least 95% of them at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class LiveGate:
    """Outcomes and latencies of one rollout step's two versions over a sliding time window (bounded).

    `verdict` (failures) costs O(1) and runs on every answer; `latency_verdict` sorts the window and
    runs on the scheduler's tick and before each advance, not per request."""

    MAX_EVENTS = 10_000  # per version: a window under heavy load keeps its newest outcomes

    def __init__(self, rollout: Rollout, settings: GateSettings | None = None) -> None:
        self.rollout = rollout
        self.settings = settings or GateSettings()
        refs = (rollout.current, rollout.candidate)
        self._events: dict[str, deque[tuple[float, bool, float]]] = {ref: deque() for ref in refs}
        self._failed = dict.fromkeys(refs, 0)  # running counts: each request costs O(1), not O(window)

    def _drop_oldest(self, ref: str) -> None:
        _, ok, _ = self._events[ref].popleft()
        self._failed[ref] -= not ok

    def record(self, ref: str, ok: bool, now: float | None = None, latency_s: float = 0.0) -> None:
        events = self._events.get(ref)
        if events is not None:
            if len(events) >= self.MAX_EVENTS:
                self._drop_oldest(ref)
            events.append((now if now is not None else time.monotonic(), ok, latency_s))
            self._failed[ref] += not ok

    def rates(self, now: float | None = None) -> dict[str, tuple[int, int]]:
        """ref -> (failures, requests) inside the window."""
        now = now if now is not None else time.monotonic()
        out = {}
        for ref, events in self._events.items():
            while events and events[0][0] < now - self.settings.window_s:
                self._drop_oldest(ref)
            out[ref] = (self._failed[ref], len(events))
        return out

    def sampled(self, now: float | None = None) -> bool:
        """Whether the candidate has answered the minimum sample inside the window."""
        return self.rates(now)[self.rollout.candidate][1] >= self.settings.min_sample

    def verdict(self, now: float | None = None) -> str | None:
        """Why the candidate fails the failure gate, or None (passing, or too few requests to tell)."""
        rates = self.rates(now)
        bad, n = rates[self.rollout.candidate]
        if n < self.settings.min_sample:
            return None
        cur_bad, cur_n = rates[self.rollout.current]
        cand_rate = bad / n
        cur_rate = cur_bad / cur_n if cur_n else 0.0
        if cand_rate > cur_rate + self.settings.max_increase:
            return (
                f"live gate: candidate failed {bad}/{n} requests ({cand_rate:.1%}) against "
                f"{cur_bad}/{cur_n} ({cur_rate:.1%}) for the current version in the last "
                f"{self.settings.window_s:g} s (allowed: +{self.settings.max_increase:.1%})"
            )
        return None

    def latencies(self, now: float | None = None) -> dict[str, tuple[float | None, int]]:
        """ref -> (p95 latency in seconds or None when empty, requests) inside the window."""
        self.rates(now)  # drops what left the window
        return {
            ref: (p95([e[2] for e in events]) if events else None, len(events))
            for ref, events in self._events.items()
        }

    def latency_verdict(self, now: float | None = None) -> str | None:
        """Why the candidate fails the p95-latency gate, or None (passing, or too few requests)."""
        lat = self.latencies(now)
        cand, n = lat[self.rollout.candidate]
        cur, cur_n = lat[self.rollout.current]
        s = self.settings
        if cand is None or cur is None or min(n, cur_n) < s.latency_min_sample:
            return None
        allowed = cur * s.p95_margin + s.p95_slack_s
        if cand > allowed:
            return (
                f"live gate: candidate p95 latency {cand:.3f} s over {n} requests against {cur:.3f} s "
                f"over {cur_n} for the current version in the last {s.window_s:g} s (allowed: "
                f"{s.p95_margin:g} x current + {s.p95_slack_s:g} s = {allowed:.3f} s)"
            )
        return None

    def any_verdict(self, now: float | None = None) -> str | None:
        return self.verdict(now) or self.latency_verdict(now)

    def figures(self, now: float | None = None) -> dict:
        """What the gates saw, for the audit trail."""
        rates, lat = self.rates(now), self.latencies(now)
        return {
            role: {"failed": rates[ref][0], "requests": rates[ref][1], "p95_s": lat[ref][0]}
            for role, ref in (("current", self.rollout.current), ("candidate", self.rollout.candidate))
        }


def output_ok(status: int, body: bytes | None) -> bool:
    """Whether one answer counts as a success for the live gate.

    A 5xx (engine error, adapter that cannot load) fails; a 4xx is the caller's doing and not counted
    against either version (the router skips it). A non-streaming answer whose choices are all empty,
    or that carries a non-finite number (NaN/Infinity in logprobs), fails too."""
    if status >= 500:
        return False
    if body is None:  # streamed, or too large to inspect: the status decides
        return True
    import json

    try:
        data = json.loads(body, parse_constant=_non_finite)
    except _NonFinite:
        return False
    except ValueError:
        return False
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        return False
    texts = [c.get("text", (c.get("message") or {}).get("content")) for c in choices if isinstance(c, dict)]
    return any(isinstance(t, str) and t != "" for t in texts)


class _NonFinite(ValueError):
    pass


def _non_finite(name: str) -> float:
    raise _NonFinite(name)
