"""`adapterhub tenant rollout ...` and `adapterhub tenant history`: canary rollouts of an alias and the
audit trail. The logic lives in adapterhub_lite/tenants/rollout*.py and serving/rollout_ops.py; these
commands only call it.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from cli.common import print_json, run_cli

ACTIONS = ("advance", "pause", "resume", "abort", "status")
USAGE = (
    "usage: adapterhub tenant rollout TENANT ALIAS REF [--canary N] [--steps 10,50,100] "
    "[--interval 5m] (--eval-file FILE | --skip-eval), or: "
    "adapterhub tenant rollout advance|pause|resume|abort|status TENANT ALIAS"
)


def _stamp(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _steps(canary: int | None, steps: str | None) -> str:
    from adapterhub_lite.errors import ErrorKind, ServingError
    from adapterhub_lite.tenants.rollout import parse_steps

    if steps is None:
        first = canary if canary is not None else 10
        return ",".join(map(str, [first, *(s for s in (50, 100) if s > first)]))
    parsed = parse_steps(steps)
    if canary is not None and canary != parsed[0]:
        raise ServingError(
            f"--canary {canary} disagrees with the first of --steps {steps}",
            hint="give one of them, or make --canary the first step",
            kind=ErrorKind.INVALID,
        )
    return steps


def register_rollout(tenant_app: typer.Typer) -> None:
    @tenant_app.command(
        "rollout",
        help="Roll out a new version of an alias to a share of its traffic behind gates, or act on a "
        "rollout in progress. " + USAGE,
    )
    @run_cli
    def rollout(
        args: Annotated[list[str], typer.Argument(help="TENANT ALIAS REF, or ACTION TENANT ALIAS")],
        canary: Annotated[int | None, typer.Option(help="the candidate's first share, percent")] = None,
        steps: Annotated[str | None, typer.Option(help="shares in percent, e.g. 10,50,100")] = None,
        interval: Annotated[
            str | None,
            typer.Option(help="advance on a schedule: a step's length (30s, 5m, 1h); else by command"),
        ] = None,
        margin: Annotated[float, typer.Option(help="exact match the candidate may lose (0..1)")] = 0.0,
        eval_file: Annotated[
            str | None, typer.Option("--eval-file", help="held-out prompt/completion JSONL for the gate")
        ] = None,
        skip_eval: Annotated[
            bool, typer.Option("--skip-eval", help="start without the evaluation gate (recorded)")
        ] = False,
        server: Annotated[
            str, typer.Option(help="the running server the gate evaluates through")
        ] = "http://127.0.0.1:8000",
        reason: Annotated[str | None, typer.Option(help="why (kept in the audit trail)")] = None,
        db: Annotated[
            str | None, typer.Option("--db", help="tenant store (else $ADAPTERHUB_TENANTS_DB)")
        ] = None,
        registry: Annotated[str | None, typer.Option("--registry", help="registry location")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        from adapterhub_lite.errors import ErrorKind, ServingError
        from adapterhub_lite.serving.rollout_ops import CLI_ACTOR
        from adapterhub_lite.tenants.rollout_store import RolloutStore, rollout_dict
        from adapterhub_lite.tenants.store import TenantStore

        if len(args) == 3 and args[0] in ACTIONS:
            action, tenant, alias = args
        elif len(args) == 4 and args[0] == "start":
            action, tenant, alias, ref = args
        elif len(args) == 3:
            action, (tenant, alias, ref) = "start", args
        else:
            raise ServingError(f"unexpected arguments {' '.join(args)!r}", hint=USAGE, kind=ErrorKind.INVALID)
        store = RolloutStore(TenantStore.open(db))
        if action == "status":
            r, result = store.latest(tenant, alias)
            if as_json:
                print_json({**rollout_dict(r), "eval": result})
                return
            every = f", a step every {r.interval_s:g} s" if r.interval_s else ""
            typer.echo(
                f"rollout {r.id} of {tenant}/{alias}: {r.state.value}, {r.percent}% to {r.candidate} "
                f"(current {r.current}; steps {','.join(map(str, r.steps))}{every}, at step {r.step + 1})"
            )
            if result:
                typer.echo(f"  {result.get('reason', '')}")
            return
        if action == "advance":
            r = _advance(store, tenant, alias, server, reason)
        elif action != "start":
            r = getattr(store, action)(tenant, alias, CLI_ACTOR, reason)
        if action != "start":
            typer.echo(f"rollout {r.id} of {tenant}/{alias}: {r.state.value}, {r.percent}% to {r.candidate}")
            if r.state.value == "rolled-back":
                raise typer.Exit(code=1)
            return
        _start(
            store,
            tenant,
            alias,
            ref,
            _steps(canary, steps),
            margin,
            eval_file,
            skip_eval,
            server,
            reason,
            registry,
            as_json,
            interval,
        )

    @tenant_app.command("history")
    @run_cli
    def history(
        tenant: str,
        alias: Annotated[str | None, typer.Argument(help="one alias (default: all of the tenant's)")] = None,
        db: Annotated[
            str | None, typer.Option("--db", help="tenant store (else $ADAPTERHUB_TENANTS_DB)")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Every alias move, rollout step, gate result and rollback: when, by whom, why (oldest first)."""
        from adapterhub_lite.display import safe
        from adapterhub_lite.tenants.rollout_store import RolloutStore
        from adapterhub_lite.tenants.store import TenantStore

        tenants = TenantStore.open(db)
        tenants.get(tenant)
        trail = RolloutStore(tenants).history(tenant, alias)
        if as_json:
            print_json([e.as_dict() for e in trail])
            return
        for e in trail:
            line = f"{_stamp(e.at)}  {e.alias:<16} {e.action:<13} {e.ref or '-':<28} by {e.actor}"
            typer.echo(safe(line + (f": {e.reason}" if e.reason else "")))


def _admin_key() -> str | None:
    from adapterhub_lite.serving.config import ServingConfig

    return ServingConfig.from_env().admin_key


def _advance(store, tenant, alias, server, reason):
    """Rerun the evaluation gate on the rollout's held-out set, then advance (or roll back)."""
    import asyncio

    from adapterhub_lite.errors import ErrorKind, ServingError
    from adapterhub_lite.serving import rollout_ops
    from adapterhub_lite.serving.config import ENV_ADMIN_KEY

    r, _ = store.latest(tenant, alias)
    admin_key = _admin_key()
    gated = r.active and store.eval_set(r.id) is not None
    if gated and not admin_key:
        raise ServingError(
            f"advancing reruns the evaluation gate, which calls the server with the admin key: set "
            f"{ENV_ADMIN_KEY}",
            kind=ErrorKind.INVALID,
        )
    if gated:
        typer.echo(f"rollout {r.id} of {tenant}/{alias}: evaluating before the next step...")
    return asyncio.run(
        rollout_ops.advance(
            store,
            r,
            server_url=server,
            admin_key=admin_key or "",
            actor=rollout_ops.CLI_ACTOR,
            reason=reason or "advanced by operator",
        )
    )


def _start(
    store,
    tenant,
    alias,
    ref,
    steps,
    margin,
    eval_file,
    skip_eval,
    server,
    reason,
    registry,
    as_json,
    interval,
):
    import asyncio

    from adapterhub_lite.errors import ErrorKind, ServingError
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving import rollout_ops
    from adapterhub_lite.serving.config import ENV_ADMIN_KEY
    from adapterhub_lite.serving.rollout_eval import load_examples
    from adapterhub_lite.tenants.rollout import parse_interval
    from adapterhub_lite.tenants.rollout_store import rollout_dict

    if (eval_file is None) == (not skip_eval):
        raise ServingError(
            "give the evaluation gate a held-out set with --eval-file FILE, or start without it "
            "with --skip-eval",
            kind=ErrorKind.INVALID,
        )
    examples = load_examples(eval_file) if eval_file else None
    interval_s = parse_interval(interval)
    admin_key = _admin_key()
    if examples is not None and not admin_key:
        raise ServingError(
            f"the evaluation gate calls the server with the admin key: set {ENV_ADMIN_KEY}",
            kind=ErrorKind.INVALID,
        )
    full = rollout_ops.check_candidate(store, open_registry(registry), tenant, ref)
    r = rollout_ops.start(
        store,
        tenant,
        alias,
        full,
        steps=steps,
        margin=margin,
        actor=rollout_ops.CLI_ACTOR,
        reason=reason,
        interval=interval_s,
        examples=examples,
    )
    every = f", a step every {interval_s:g} s" if interval_s else ""
    typer.echo(f"rollout {r.id} of {tenant}/{alias}: {r.current} -> {full}, steps {steps}{every}; evaluating")
    r = asyncio.run(
        rollout_ops.run_gate(
            store,
            r,
            server_url=server,
            admin_key=admin_key or "",
            examples=examples,
            actor=rollout_ops.CLI_ACTOR,
        )
    )
    _, result = store.latest(tenant, alias)
    if as_json:
        print_json({**rollout_dict(r), "eval": result})
    else:
        typer.echo(f"  {(result or {}).get('reason', '')}")
        typer.echo(f"rollout {r.id}: {r.state.value}" + (f", {r.percent}% to {full}" if r.percent else ""))
    if r.percent == 0:
        raise typer.Exit(code=1)
