"""Starting a rollout, as the CLI and the admin API both do it: check the candidate, record the
rollout (pending-eval, no traffic), run the evaluation gate, and record its verdict.

A rollout whose gate fails (or whose gate cannot run) never routes a request to the candidate.
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
) -> Rollout:
    """Record the rollout in `pending-eval` (validates everything before the gate spends time)."""
    return store.start(tenant, alias, candidate, steps=steps, margin=margin, actor=actor, reason=reason)


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
        try:
            passed, result = await evaluate(
                server_url, admin_key, rollout.current, rollout.candidate, examples, rollout.margin
            )
        except AdapterHubError as exc:
            passed, result = (
                False,
                {
                    "metric": "exact_match",
                    "passed": False,
                    "reason": f"evaluation gate could not run: {exc.message}",
                },
            )
    return await asyncio.to_thread(
        store.record_eval, rollout.tenant, rollout.alias, rollout.id, passed, result, actor
    )
