"""Rollout routes of the admin API (admin key only; the middleware has checked it before we run).

    GET  /adapterhub/v1/rollouts                              active rollouts, as this replica routes them
    GET  /adapterhub/v1/rollouts/{tenant}/{alias}             the alias's newest rollout and its eval result
    POST /adapterhub/v1/rollouts/{tenant}/{alias}             start one: {"candidate", "steps", "margin",
                                                              "interval" ("5m", or null: by command),
                                                              "eval": [{"prompt","completion"}...] | null,
                                                              "skip_eval": bool, "reason"}; 202, the gate
                                                              runs in the background against this server
    POST /adapterhub/v1/rollouts/{tenant}/{alias}/{advance|pause|resume|abort}   {"reason"}
                                                              (advance reruns the evaluation gate first)
    GET  /adapterhub/v1/history/{tenant}[/{alias}]            the audit trail

So an operator under load can act with one HTTP request instead of starting a CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapterhub_lite.errors import AdapterHubError
from adapterhub_lite.serving import rollout_ops
from adapterhub_lite.serving.gateway.admin_state import AdminState
from adapterhub_lite.serving.gateway.asgi import (
    Receive,
    Scope,
    Send,
    read_body,
    send_error,
    send_json,
    send_project_error,
)
from adapterhub_lite.serving.gateway.rollout_schedule import server_url
from adapterhub_lite.serving.rollout_eval import MAX_EXAMPLES, Example
from adapterhub_lite.tenants.rollout import parse_interval
from adapterhub_lite.tenants.rollout_store import RolloutStore, rollout_dict

logger = logging.getLogger("adapterhub.rollout")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_ROLLOUT = re.compile(rf"rollouts/({_NAME})/({_NAME})(?:/(advance|pause|resume|abort))?")
_HISTORY = re.compile(rf"history/({_NAME})(?:/({_NAME}))?")
_tasks: set[asyncio.Task] = set()


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=500)


class _Start(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidate: str = Field(max_length=300)
    steps: str = Field(default="10,50,100", max_length=100)
    interval: str | None = Field(default=None, max_length=20)
    margin: float = Field(default=0.0, ge=0.0, le=1.0)
    eval: list[Example] | None = Field(default=None, max_length=MAX_EXAMPLES)
    skip_eval: bool = False
    reason: str | None = Field(default=None, max_length=500)


async def rollout_route(mw: AdminState, scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer the request if it is a rollout route; False if it is not one of ours."""
    method, sub = scope["method"], scope["path"][len("/adapterhub/v1/") :]
    if sub == "rollouts" and method == "GET":
        await mw.rollouts.refresh_async()  # the router's state is written on the loop only
        await send_json(send, 200, {"rollouts": [rollout_dict(r) for r in mw.rollouts.active()]})
        return True
    store = mw.rollouts.rollouts
    actor = rollout_ops.admin_actor(mw.config.admin_key or "")
    if m := _HISTORY.fullmatch(sub):
        if method != "GET":
            return False
        try:
            trail = await asyncio.to_thread(store.history, m.group(1), m.group(2))
        except AdapterHubError as exc:
            await send_project_error(send, exc, exc.message)
            return True
        await send_json(send, 200, {"events": [e.as_dict() for e in trail]})
        return True
    m = _ROLLOUT.fullmatch(sub)
    if m is None:
        return False
    tenant, alias, action = m.groups()
    try:
        if method == "GET" and action is None:
            r, result = await asyncio.to_thread(store.latest, tenant, alias)
            await send_json(send, 200, {**rollout_dict(r), "eval": result})
            return True
        if method != "POST":
            return False
        body = await read_body(receive)
        if body is None:
            await send_error(send, 413, "request body too large", "BadRequestError")
            return True
        try:
            raw: Any = json.loads(body or b"{}")
            if action is not None:
                req = _Action.model_validate(raw)
            else:
                start = _Start.model_validate(raw)
        except (ValueError, ValidationError) as e:
            first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else "not JSON"
            await send_error(send, 400, f"invalid request body: {first}", "BadRequestError")
            return True
        if action == "advance":
            current, _ = await asyncio.to_thread(store.latest, tenant, alias)
            r = await rollout_ops.advance(
                store,
                current,
                server_url=server_url(scope),
                admin_key=mw.config.admin_key or "",
                actor=actor,
                reason=req.reason or "advanced by operator",
            )
            await send_json(send, 200, rollout_dict(r))
            return True
        if action is not None:
            fn = getattr(store, action)
            r = await asyncio.to_thread(fn, tenant, alias, actor, req.reason)
            await send_json(send, 200, rollout_dict(r))
            return True
        await _start(mw, scope, send, store, tenant, alias, start, actor)
    except AdapterHubError as exc:
        await send_project_error(send, exc, exc.message)
    return True


async def _start(
    mw: AdminState,
    scope: Scope,
    send: Send,
    store: RolloutStore,
    tenant: str,
    alias: str,
    req: _Start,
    actor: str,
) -> None:
    if req.eval is None and not req.skip_eval:
        await send_error(
            send,
            400,
            "give a held-out set as `eval`, or `skip_eval: true` to start without the gate",
            "BadRequestError",
        )
        return
    parse_interval(req.interval)  # a bad interval is refused before anything is checked or stored
    registry = mw.registry.registry
    full = await asyncio.to_thread(rollout_ops.check_candidate, store, registry, tenant, req.candidate)
    r = await asyncio.to_thread(
        rollout_ops.start,
        store,
        tenant,
        alias,
        full,
        steps=req.steps,
        margin=req.margin,
        actor=actor,
        reason=req.reason,
        interval=req.interval,
        examples=None if req.skip_eval else req.eval,
    )
    url = server_url(scope)

    async def gate() -> None:
        try:
            await rollout_ops.run_gate(
                store,
                r,
                server_url=url,
                admin_key=mw.config.admin_key or "",
                examples=None if req.skip_eval else req.eval,
                actor=actor,
            )
        except AdapterHubError as exc:
            logger.warning("adapterhub: evaluation gate of rollout %s: %s", r.id, exc.message)

    task = asyncio.get_running_loop().create_task(gate())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    await send_json(send, 202, rollout_dict(r))
