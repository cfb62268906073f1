"""The gateway's side of a rollout: which version answers each request, and the live gate.

Each request of an alias under rollout is resolved once, here, to the current or the candidate
reference (rollout.choose), before anything else happens to it; the request then runs on that version
to its end whatever moves meanwhile. The response carries `x-adapterhub-adapter: <full ref>`.

The active rollouts are held in memory and re-read only when the tenant store's change probe moves
(the same probe that makes a promote visible on the next request), so a step, an abort or a rollback
made on any replica or by the CLI reaches every replica as fast as a promote does.

Outcomes (5xx, empty or non-finite answers) and latencies of both versions feed the rollout step's
live gate; when the candidate fails the failure gate (checked on every answer) or the p95-latency gate
(checked on the scheduler's tick, rollout_schedule.py), this replica stops routing to the candidate at
once and writes the rollback to the store (off the event loop), which every other replica then sees.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

from adapterhub_lite.errors import AdapterHubError
from adapterhub_lite.serving.gateway.asgi import Message, Send
from adapterhub_lite.tenants.rollout import (
    ANSWERED_BY_HEADER,
    ROUTING,
    GateSettings,
    LiveGate,
    Rollout,
    caller_key,
    choose,
    output_ok,
)
from adapterhub_lite.tenants.rollout_store import RolloutStore
from adapterhub_lite.tenants.store import TenantStore
from adapterhub_lite.tenants.view import Target

logger = logging.getLogger("adapterhub.rollout")
MAX_INSPECT_BYTES = 256 * 1024  # a non-streaming answer up to this size is checked for empty/non-finite


class RolloutRouter:
    """Routes aliases under rollout and runs their live gates, for one gateway process."""

    def __init__(self, store: TenantStore, settings: GateSettings | None = None) -> None:
        self.rollouts = RolloutStore(store)
        self.settings = settings or GateSettings()
        self.version: int | None = None
        self._active: dict[tuple[str, str], Rollout] = {}
        self._gates: dict[int, LiveGate] = {}
        self._stopped: set[int] = set()  # rolled back here, the store write may still be under way
        self._rng = random.Random()
        self._tasks: set[asyncio.Task] = set()
        self.scheduler = None  # rollout_schedule.Scheduler, once a request has started it

    def refresh(self) -> None:
        """Re-read the active rollouts if the store changed (blocking: tests and the CLI's side)."""
        version = self.rollouts.data_version()
        if version != self.version:
            self._apply(version, self.rollouts.active_all())

    async def refresh_async(self) -> None:
        """As `refresh`, for the event loop: the change probe is in memory (or a local SQLite read), the
        re-read runs in a worker thread, so a slow or partitioned database never holds the loop; the
        router's state is still written on the loop only."""
        version = self.rollouts.data_version()
        if version != self.version:
            active = await asyncio.to_thread(self.rollouts.active_all)
            self._apply(version, active)

    def _apply(self, version: int, active: dict[tuple[str, str], Rollout]) -> None:
        self._active = active
        self.version = version
        live = {r.id for r in self._active.values()}
        for rid in [rid for rid in self._gates if rid not in live]:
            del self._gates[rid]
        self._stopped &= live

    def active(self) -> list[Rollout]:
        return list(self._active.values())

    async def route_fresh(
        self, tenant: str | None, model: str, target: Target, payload: dict, headers: list
    ) -> tuple[Target, Rollout | None]:
        """`route` on the store's current state (re-read off the loop if it moved): the request path."""
        if tenant is None or not target.managed:
            return target, None
        try:
            await self.refresh_async()
        except AdapterHubError:
            # The store just answered this request's key lookup; if it is gone now, keep the alias's
            # current version: never the candidate on stale state.
            return target, None
        return self.route(tenant, model, target, payload, headers)

    def route(
        self, tenant: str | None, model: str, target: Target, payload: dict, headers: list
    ) -> tuple[Target, Rollout | None]:
        """The version of `model` that answers this request, and the rollout that chose it (or None),
        on the state of the last refresh."""
        if tenant is None or not target.managed:
            return target, None
        r = self._active.get((tenant, model))
        if r is None or r.state not in ROUTING or target.name != r.current or r.id in self._stopped:
            return target, None  # (an alias moved by hand during a rollout: its new ref, untouched)
        return Target(choose(r, caller_key(payload, headers), self._rng), True), r

    def ensure_scheduler(self, scope: dict, admin_key: str | None) -> None:
        """Start this replica's rollout scheduler (steps on a schedule) on the running loop, once."""
        if self.scheduler is None:
            from adapterhub_lite.serving.gateway.rollout_schedule import Scheduler

            self.scheduler = Scheduler(self, scope, admin_key)
        self.scheduler.ensure_running()

    def gate(self, rollout: Rollout) -> LiveGate | None:
        """The live gate of the rollout's current step on this replica (None before any answer)."""
        gate = self._gates.get(rollout.id)
        return gate if gate is not None and gate.rollout.step == rollout.step else None

    def _gate_for(self, rollout: Rollout) -> LiveGate:
        gate = self._gates.get(rollout.id)
        if gate is None or gate.rollout.step < rollout.step:  # each step is judged on its own answers
            gate = self._gates[rollout.id] = LiveGate(rollout, self.settings)
        return gate

    def observe(self, send: Send, target: Target, rollout: Rollout | None) -> Send:
        """`send` that names the answering version in a header and, under a rollout, feeds the gate."""
        if not target.managed:
            return send
        status = 0
        body: bytearray | None = bytearray()
        began = time.monotonic()

        async def observed(message: Message) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((ANSWERED_BY_HEADER, target.name.encode()))
                message = {**message, "headers": headers}
                if any(k.lower() == b"content-type" and b"event-stream" in v for k, v in headers):
                    body = None  # streamed: the status decides
            elif message["type"] == "http.response.body" and rollout is not None:
                if body is not None:
                    chunk = message.get("body", b"")
                    if len(body) + len(chunk) > MAX_INSPECT_BYTES:
                        body = None
                    else:
                        body += chunk
                if not message.get("more_body", False):
                    self._outcome(
                        rollout,
                        target.name,
                        status,
                        bytes(body) if body is not None else None,
                        time.monotonic() - began,
                    )
            await send(message)

        return observed

    def _outcome(self, rollout: Rollout, ref: str, status: int, body: bytes | None, latency_s: float) -> None:
        if 400 <= status < 500:
            return  # the caller's fault (limits, bad input): says nothing about either version
        gate = self._gate_for(rollout)
        gate.record(ref, output_ok(status, body), latency_s=latency_s)
        if rollout.id in self._stopped:
            return
        why = gate.verdict()
        if why is not None:
            self.stop(gate.rollout, why, gate)

    def stop(self, rollout: Rollout, why: str, gate: LiveGate) -> None:
        """The candidate failed a live gate: stop routing to it here now, and store the rollback."""
        self._stopped.add(rollout.id)  # this replica stops routing to the candidate now
        failed, total = gate.rates()[rollout.candidate]
        detail = {"failed": failed, "requests": total, "replica": os.getpid(), "gates": gate.figures()}
        logger.warning("adapterhub: rolling back %s/%s: %s", rollout.tenant, rollout.alias, why)
        task = asyncio.get_running_loop().create_task(self._roll_back(rollout, why, detail))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _roll_back(self, rollout: Rollout, why: str, detail: dict) -> None:
        for attempt in range(5):
            try:
                await asyncio.to_thread(
                    self.rollouts.roll_back, rollout.tenant, rollout.alias, rollout.id, why, "gate", detail
                )
                return
            except AdapterHubError as exc:
                if exc.kind.value == "conflict":  # already ended (another replica, an operator)
                    return
                logger.warning(
                    "adapterhub: rollback of rollout %s not stored yet: %s", rollout.id, exc.message
                )
                await asyncio.sleep(0.5 * (attempt + 1))
