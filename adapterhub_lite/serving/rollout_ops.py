"""Starting and advancing a rollout, as the CLI, the admin API and the scheduler all do it: check the
candidate, record the rollout (pending-eval, no traffic), run the evaluation gate, and record its
verdict; before each advance, rerun the gate on the stored held-out set.

A rollout whose gate fails (or whose gate cannot run) never routes a request to the candidate, and
an advance whose gate fails rolls the rollout back instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from adapterhub_lite import keys
from adapterhub_lite.errors import AdapterHubError
from adapterhub_lite.registry.contract import RegistryAPI
from adapterhub_lite.serving.rollout_eval import Example, evaluate
from adapterhub_lite.tenants.rollout import Rollout
from adapterhub_lite.tenants.rollout_store import RolloutStore
from adapterhub_lite.tenants.view import usable_ref

CLI_ACTOR = "cli"


def admin_actor(admin_key: str) -> str:
    """How the audit trail names an admin key: a short id of its digest, never the key."""
    return "admin:" + keys.digest(admin_key)[:8]


def check_candidate(store: RolloutStore, registry: RegistryAPI, tenant: str, ref: str) -> str:
    """The candidate's full reference, if the registry knows it, it is not yanked, and the tenant may
    read it (as `tenant promote` checks)."""
    return usable_ref(store.tenants, registry, tenant, ref, "rolled out")


def start(
    store: RolloutStore,
    tenant: str,
    alias: str,
    candidate: str,
    *,
    steps: str,
    margin: float,
    actor: str,
    reason: str | None = None,
    interval: str | float | None = None,
    examples: list[Example] | None = None,
) -> Rollout:
    """Record the rollout in `pending-eval` (validates everything before the gate spends time); the
    held-out set is kept with it so that every advance reruns the gate."""
    return store.start(
        tenant,
        alias,
        candidate,
        steps=steps,
        margin=margin,
        actor=actor,
        reason=reason,
        interval_s=interval,
        eval_set=[e.model_dump() for e in examples] if examples is not None else None,
    )


async def _gate(server_url: str, admin_key: str, r: Rollout, examples: list[Example]) -> tuple[bool, dict]:
    try:
        return await evaluate(server_url, admin_key, r.current, r.candidate, examples, r.margin)
    except AdapterHubError as exc:
        return False, {
            "metric": "exact_match",
            "passed": False,
            "reason": f"evaluation gate could not run: {exc.message}",
        }


async def run_gate(
    store: RolloutStore,
    rollout: Rollout,
    *,
    server_url: str,
    admin_key: str,
    examples: list[Example] | None,
    actor: str,
) -> Rollout:
    """Run the evaluation gate (or record that the operator skipped it) and store the verdict. A gate
    that cannot run refuses the rollout: no traffic without evidence."""
    if examples is None:
        result: dict[str, Any] = {
            "metric": None,
            "passed": True,
            "reason": "evaluation gate skipped by operator",
        }
        passed = True
    else:
        passed, result = await _gate(server_url, admin_key, rollout, examples)
    return await asyncio.to_thread(
        store.record_eval, rollout.tenant, rollout.alias, rollout.id, passed, result, actor
    )


async def advance(
    store: RolloutStore,
    rollout: Rollout,
    *,
    server_url: str,
    admin_key: str,
    actor: str,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Rollout:
    """Advance `rollout` from the step it is in, after rerunning the evaluation gate on its stored
    held-out set: a failure rolls it back (recording the gate's result), a pass takes the next step
    (or promotes). Both are compare-and-set on the step: CONFLICT if the rollout moved meanwhile
    (another replica's scheduler, an operator), and then nothing is written."""
    stored = await asyncio.to_thread(store.eval_set, rollout.id)
    if stored is None:
        result: dict[str, Any] = {"passed": True, "reason": "no held-out set (evaluation gate skipped)"}
    else:
        examples = [Example.model_validate(e) for e in stored]
        passed, result = await _gate(server_url, admin_key, rollout, examples)
        if not passed:
            return await asyncio.to_thread(
                store.roll_back,
                rollout.tenant,
                rollout.alias,
                rollout.id,
                f"step {rollout.step + 1}: {result['reason']}",
                actor,
                {**(detail or {}), "eval": result},
                rollout.step,
            )
    return await asyncio.to_thread(
        lambda: store.advance(
            rollout.tenant,
            rollout.alias,
            actor,
            reason,
            rollout_id=rollout.id,
            at_step=rollout.step,
            detail={**(detail or {}), "eval": result},
        )
    )
