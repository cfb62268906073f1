"""Steps on a schedule: who advances a rollout when no operator does.

Every gateway replica runs one `Scheduler` task on its event loop (started by the first request, as
the eviction sweeper is). Each tick (`TICK_S`) it:
- runs the p95-latency live gate of every routing rollout on this replica's answers (the failure gate
  already runs on every answer), rolling the rollout back when the candidate fails it;
- for each rollout whose step has lasted its `interval_s` (rollout.due), once this replica has seen the
  minimum sample of candidate answers in the step and both live gates pass, reruns the evaluation gate
  and advances the rollout (or, past the last step, promotes it) - rollout_ops.advance.

Several replicas may decide at once that a step is over. The advance is a compare-and-set in the store
(from this step, while routing: RolloutStore.advance with `at_step`), taken inside the store's write
transaction, so exactly one replica moves it and the others get CONFLICT and do nothing; they all see
the new step through the change probe on their next request or tick. A replica without traffic for the
alias never advances it (it has no evidence), and a rollout that no replica is serving waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from adapterhub_lite.errors import AdapterHubError, ErrorKind
from adapterhub_lite.serving import rollout_ops
from adapterhub_lite.tenants.rollout import ROUTING, Rollout, State

logger = logging.getLogger("adapterhub.rollout")
TICK_S = 1.0  # how late a due step or a slow candidate may be noticed; one cheap probe per tick
ACTOR = "schedule"


def server_url(scope: dict) -> str:
    """This server's own loopback URL (the evaluation gate runs through it), from a request's scope."""
    host, port = scope.get("server") or ("127.0.0.1", 8000)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "", None) else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


class Scheduler:
    """One replica's rollout scheduler (see the module docstring)."""

    def __init__(self, router: Any, scope: dict, admin_key: str | None) -> None:
        """`router`: the replica's RolloutRouter (which imports this module, so not named here)."""
        self.router = router
        self.url = server_url(scope)
        self.admin_key = admin_key or ""
        self._task: asyncio.Task | None = None
        self._busy: dict[int, asyncio.Task] = {}  # rollout id -> its advance under way here

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except Exception:  # never let the scheduler die silently
                logger.exception("adapterhub: rollout scheduler tick failed")

    async def tick(self, now: float | None = None) -> list[asyncio.Task]:
        """One pass over the active rollouts (`now`: wall-clock time, for tests); returns the advances
        it started (each a task: its evaluation gate takes a while)."""
        router = self.router
        try:
            await router.refresh_async()  # the re-read off the loop: a silent database holds no request
        except AdapterHubError:
            return []  # the store is away: no step moves on a view we cannot check
        started = []
        for r in router.active():
            if r.state not in ROUTING or r.id in router._stopped:
                continue
            gate = router.gate(r)
            why = gate.any_verdict() if gate is not None else None
            if why is not None:
                router.stop(r, why, gate)
                continue
            if r.id in self._busy or not r.due(now) or gate is None or not gate.sampled():
                continue
            task = asyncio.get_running_loop().create_task(self._advance(r, gate.figures()))
            self._busy[r.id] = task
            task.add_done_callback(lambda _t, rid=r.id: self._busy.pop(rid, None))
            started.append(task)
        return started

    async def _advance(self, r: Rollout, figures: dict) -> Rollout | None:
        reason = (
            f"step {r.step + 1} ({r.steps[r.step]}%) lasted {r.interval_s:g} s and its live gates passed "
            f"on {figures['candidate']['requests']} candidate answers"
        )
        try:
            after = await rollout_ops.advance(
                self.router.rollouts,
                r,
                server_url=self.url,
                admin_key=self.admin_key,
                actor=ACTOR,
                reason=reason,
                detail={"gates": figures, "at": time.time()},
            )
        except AdapterHubError as exc:
            if exc.kind is ErrorKind.CONFLICT:  # another replica (or an operator) moved it first
                return None
            logger.warning("adapterhub: scheduled advance of rollout %s failed: %s", r.id, exc.message)
            return None
        if after.state is State.ROLLED_BACK:  # the step's evaluation gate failed: stop here at once
            self.router._stopped.add(r.id)
        logger.info("adapterhub: rollout %s of %s/%s is now %s", r.id, r.tenant, r.alias, after.state.value)
        return after
