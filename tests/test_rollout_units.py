"""The rollout's pure logic and its persistence in a real tenant store (SQLite, and PostgreSQL)."""

from __future__ import annotations

import math
import random

import pytest

from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.tenants.rollout import (
    GateSettings,
    LiveGate,
    Rollout,
    State,
    bucket,
    caller_key,
    choose,
    output_ok,
    parse_steps,
)

CUR, CAND = "acme/bot@1.0.0", "acme/bot@2.0.0"


def _rollout(state=State.CANARY, step=0, steps=(10, 50, 100), rid=7) -> Rollout:
    return Rollout(rid, "acme", "bot", CUR, CAND, steps, step, state, 0.0, 0.0, 0.0)


# -- state machine -----------------------------------------------------------------------------------


def test_state_machine_walks_pending_canary_steps_promoted():
    r = _rollout(State.PENDING_EVAL)
    assert r.percent == 0
    r = r.eval_passed()
    assert (r.state, r.percent) == (State.CANARY, 10)
    r = r.advance()
    assert (r.state, r.percent) == (State.CANARY, 50)
    r = r.pause()
    assert (r.state, r.percent) == (State.PAUSED, 50)  # paused keeps its split, does not advance
    with pytest.raises(ServingError) as e:
        r.advance()
    assert e.value.kind is ErrorKind.CONFLICT
    r = r.resume().advance()
    assert r.percent == 100
    r = r.advance()
    assert r.state is State.PROMOTED and not r.active and r.percent == 0


@pytest.mark.parametrize("final", [State.PROMOTED, State.ROLLED_BACK, State.ABORTED])
def test_final_states_accept_nothing(final):
    r = _rollout(final)
    for move in (r.advance, r.pause, r.resume, r.abort, r.roll_back, r.eval_passed, r.eval_failed):
        with pytest.raises(ServingError):
            move()


def test_refused_and_aborted_rollouts_route_nothing():
    assert _rollout(State.PENDING_EVAL).eval_failed().state is State.ROLLED_BACK
    assert _rollout(State.PENDING_EVAL).abort().percent == 0
    assert _rollout(State.PENDING_EVAL).percent == 0
    with pytest.raises(ServingError):
        _rollout(State.PENDING_EVAL).roll_back()  # nothing to roll back before traffic


def test_parse_steps():
    assert parse_steps("10, 50,100") == (10, 50, 100)
    assert parse_steps("25") == (25,)
    for bad in ("", "0,50", "50,10", "10,10", "10,101", "abc", "-5", "1e2"):
        with pytest.raises(ServingError) as e:
            parse_steps(bad)
        assert e.value.kind is ErrorKind.INVALID


# -- the split ---------------------------------------------------------------------------------------


def test_sticky_split_is_fixed_per_caller_and_monotone_in_steps():
    r10 = _rollout(step=0)
    r50 = r10.advance()
    for i in range(500):
        caller = f"user-{i}"
        first = choose(r10, caller)
        assert all(choose(r10, caller) == first for _ in range(3))
        if first == CAND:  # a caller on the candidate at 10% stays there at 50%
            assert choose(r50, caller) == CAND


def test_split_fraction_within_binomial_99_interval():
    # Per rollout, n callers each land on the candidate with p = 0.1: the count lies within
    # p*n +- 2.576*sqrt(n p (1-p)) with probability 0.99. Over 200 rollouts (ids) about 2 fall
    # outside; more than 8 has probability < 1e-3 (Binomial(200, 0.01)) for an unbiased split, while
    # a biased bucket (e.g. one hash byte, or modulo bias) puts most rollouts outside.
    n, p, trials = 1000, 0.10, 200
    half = 2.576 * math.sqrt(n * p * (1 - p))
    sticky = [sum(choose(_rollout(rid=t), f"caller-{i}") == CAND for i in range(n)) for t in range(trials)]
    rng = random.Random(1)
    anon = [sum(choose(_rollout(rid=t), None, rng) == CAND for _ in range(n)) for t in range(trials)]
    for counts in (sticky, anon):
        outside = sum(abs(c - n * p) > half for c in counts)
        assert outside <= 8, outside
        assert abs(sum(counts) / (n * trials) - p) < 0.005  # 200k draws: sd 0.00067


def test_bucket_depends_on_rollout_id():
    # Another rollout reshuffles callers: the same 10% do not always get every canary.
    a = {i for i in range(1000) if bucket(1, f"u{i}") < 10}
    b = {i for i in range(1000) if bucket(2, f"u{i}") < 10}
    assert a != b and all(0 <= bucket(3, f"u{i}") < 100 for i in range(100))


def test_caller_key_prefers_user_then_header():
    h = [(b"X-AdapterHub-Caller", b"hdr")]
    assert caller_key({"user": "u1"}, h) == "u1"
    assert caller_key({}, h) == "hdr"
    assert caller_key({"user": 5}, []) is None  # not a string: no key, random split
    assert caller_key({"user": ""}, []) is None


# -- live gate and outputs ---------------------------------------------------------------------------


def test_live_gate_needs_min_sample_then_fails_a_worse_candidate():
    gate = LiveGate(_rollout(), GateSettings(window_s=10, min_sample=5, max_increase=0.1))
    for _ in range(20):
        gate.record(CUR, True, now=1.0)
    for _ in range(4):
        gate.record(CAND, False, now=1.0)
    assert gate.verdict(now=1.0) is None  # 4 < min_sample
    gate.record(CAND, False, now=1.0)
    why = gate.verdict(now=1.0)
    assert why and "5/5" in why
    assert gate.verdict(now=20.0) is None  # outside the window: no evidence left
    gate.record("acme/other@9", False, now=20.0)  # a ref outside the rollout is ignored
    assert set(gate.rates(now=20.0)) == {CUR, CAND}


def test_live_gate_passes_a_candidate_as_good_as_current():
    gate = LiveGate(_rollout(), GateSettings(window_s=10, min_sample=5, max_increase=0.1))
    for i in range(50):
        gate.record(CUR, i % 10 != 0, now=1.0)  # 10% failures
        gate.record(CAND, i % 6 != 0, now=1.0)  # 18%: within +10 points
    assert gate.verdict(now=1.0) is None


def test_output_ok():
    assert output_ok(200, b'{"choices": [{"text": "hi"}]}')
    assert output_ok(200, b'{"choices": [{"message": {"content": "hi"}}]}')
    assert output_ok(200, None)  # streamed: status decides
    assert not output_ok(500, b"{}")
    assert not output_ok(200, b'{"choices": [{"text": ""}]}')
    assert not output_ok(200, b'{"choices": [{"text": "x", "logprobs": {"token_logprobs": [NaN]}}]}')
    assert not output_ok(200, b"not json")


def test_live_gate_is_bounded_and_its_counts_stay_exact():
    gate = LiveGate(_rollout(), GateSettings(window_s=10, min_sample=5, max_increase=0.1))
    for i in range(LiveGate.MAX_EVENTS + 500):
        gate.record(CAND, i % 2 == 0, now=1.0)
    bad, n = gate.rates(now=1.0)[CAND]
    assert n == LiveGate.MAX_EVENTS and bad == LiveGate.MAX_EVENTS // 2
    assert gate.rates(now=12.0)[CAND] == (0, 0)


# -- steps on a schedule and the p95-latency gate ------------------------------------------------------


def test_parse_interval():
    from adapterhub_lite.tenants.rollout import parse_interval

    assert parse_interval("90") == 90.0 and parse_interval("30s") == 30.0
    assert parse_interval("5m") == 300.0 and parse_interval("1h") == 3600.0
    assert parse_interval(None) is None and parse_interval(2) == 2.0
    for bad in ("5 minutes", "-1", "0.5s", "8d", "1e3", "9999999h"):
        with pytest.raises(ServingError) as e:
            parse_interval(bad)
        assert e.value.kind is ErrorKind.INVALID and "\n" not in e.value.message


def test_a_step_is_due_once_its_interval_has_passed_while_canary():
    from dataclasses import replace

    r = replace(_rollout(), interval_s=60.0, step_started=1000.0)
    assert not r.due(now=1059.9) and r.due(now=1060.0)
    assert not replace(r, interval_s=None).due(now=1e9)  # by command only
    assert not replace(r, state=State.PAUSED).due(now=1e9)
    nxt = r.advance(now=2000.0)
    assert nxt.step_started == 2000.0 and not nxt.due(now=2059.0)  # each step gets its own interval
    assert r.pause(now=1500.0).resume(now=3000.0).step_started == 3000.0


def test_p95_is_the_nearest_rank():
    from adapterhub_lite.tenants.rollout import p95

    # ceil(0.95 * n)-th smallest: n=20 -> 19th, n=10 -> 10th (the largest), n=100 -> 95th.
    assert p95([float(i) for i in range(1, 21)]) == 19.0
    assert p95([float(i) for i in range(1, 11)]) == 10.0
    assert p95([float(i) for i in range(100, 0, -1)]) == 95.0
    assert p95([0.5]) == 0.5


def test_latency_gate_arithmetic():
    s = GateSettings(window_s=10, latency_min_sample=20, p95_margin=1.5, p95_slack_s=0.05)
    gate = LiveGate(_rollout(), s)
    # current: p95 of nineteen 0.1 s answers and one 2 s cold load = the 19th smallest = 0.1 s
    for i in range(20):
        gate.record(CUR, True, now=1.0, latency_s=2.0 if i == 0 else 0.1)
    # allowed: 1.5 x 0.1 + 0.05 = 0.2 s. Candidate: eighteen at 0.19, then 0.3 and a 5 s cold load:
    # p95 = 19th smallest = 0.3 > 0.2: fails.
    for lat in [0.19] * 18 + [0.3]:
        gate.record(CAND, True, now=1.0, latency_s=lat)
    assert gate.latency_verdict(now=1.0) is None  # 19 < the latency sample
    gate.record(CAND, True, now=1.0, latency_s=5.0)
    why = gate.latency_verdict(now=1.0)
    assert why and "0.300 s over 20 requests" in why and "0.100 s over 20" in why and "= 0.200 s" in why
    assert gate.any_verdict(now=1.0) == why and gate.verdict(now=1.0) is None  # no failures counted

    ok = LiveGate(_rollout(), s)
    for i in range(20):
        ok.record(CUR, True, now=1.0, latency_s=2.0 if i == 0 else 0.1)
        ok.record(CAND, True, now=1.0, latency_s=5.0 if i == 0 else 0.19)  # p95 0.19 <= 0.2
    assert ok.latency_verdict(now=1.0) is None
    assert ok.figures(now=1.0)["candidate"] == {"failed": 0, "requests": 20, "p95_s": 0.19}
    assert ok.latency_verdict(now=12.0) is None and ok.latencies(now=12.0)[CAND] == (None, 0)
