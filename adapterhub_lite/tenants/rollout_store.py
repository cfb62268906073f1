"""Rollouts and their audit trail, kept in the tenant store's own database (SQLite or PostgreSQL).

Two tables beside the tenant store's, versioned under their own `meta` key (`rollout_schema_version`)
through the same migration mechanism (db/schema.py), so they migrate independently of the tenant
tables:
- `rollouts`: one row per rollout (see rollout.py for the state machine); at most one active rollout
  per alias (a partial unique index, so two operators starting one at once cannot both succeed);
- `rollout_events`: the audit trail: every rollout step, gate result, rollback, and every alias move
  a rollout makes, with when, by whom (`cli`, or `admin:<key id>`) and why.

Every change is one transaction that also tells the tenant store's change feed (`tenancy.CHANNEL`), so
every replica's gateway sees it on its next request, exactly as it sees a promote. A promotion moves
the alias (and writes its `alias_history` row) in the same transaction that ends the rollout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from adapterhub_lite.db import migrate
from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.tenants.rollout import ACTIVE, Rollout, State, parse_interval, parse_steps
from adapterhub_lite.tenants.store import CHANNEL, TenantStore, alias_history, aliases, is_full_ref

SCHEMA_KEY = "rollout_schema_version"
SCHEMA_VERSION = 2  # 2: steps on a schedule (interval_s, step_started) and the stored eval set
MAX_REASON_CHARS = 500
MAX_HISTORY_ROWS = 1000

metadata = sa.MetaData()
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("alias", sa.Text, nullable=False),
    sa.Column("current_ref", sa.Text, nullable=False),
    sa.Column("candidate", sa.Text, nullable=False),
    sa.Column("steps", sa.Text, nullable=False),  # "10,50,100"
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("active", sa.Integer, nullable=False),  # 1 while pending-eval, canary or paused
    sa.Column("margin", sa.Float, nullable=False),
    sa.Column("eval_result", sa.Text),  # JSON, once the evaluation gate ran
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("interval_s", sa.Float),  # a step's length when steps advance on a schedule
    sa.Column("step_started", sa.Float),
    sa.Column("eval_set", sa.Text),  # JSON [{"prompt", "completion"}]: rerun before every advance
)
sa.Index(
    "one_active_rollout_per_alias",
    rollouts.c.tenant,
    rollouts.c.alias,
    unique=True,
    sqlite_where=rollouts.c.active == 1,
    postgresql_where=rollouts.c.active == 1,
)
events = sa.Table(
    "rollout_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("alias", sa.Text, nullable=False),
    sa.Column("rollout", sa.Integer),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("ref", sa.Text),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text),  # JSON
)
sa.Index("rollout_events_by_alias", events.c.tenant, events.c.alias, events.c.id)
_r = rollouts.c
_e = events.c


def _upgrade_2(con: Connection) -> None:
    for column in ("interval_s FLOAT", "step_started FLOAT", "eval_set TEXT"):
        con.execute(sa.text(f"ALTER TABLE rollouts ADD COLUMN {column}"))


UPGRADES = {2: _upgrade_2}


@dataclass(frozen=True)
class Event:
    """One line of an alias's audit trail."""

    at: float
    tenant: str
    alias: str
    rollout: int | None
    action: str
    ref: str | None
    actor: str
    reason: str
    detail: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "tenant": self.tenant,
            "alias": self.alias,
            "rollout": self.rollout,
            "action": self.action,
            "ref": self.ref,
            "actor": self.actor,
            "reason": self.reason,
            "detail": self.detail,
        }


def rollout_dict(r: Rollout) -> dict[str, Any]:
    """A rollout as JSON for the admin API and `--json`."""
    return {
        "id": r.id,
        "tenant": r.tenant,
        "alias": r.alias,
        "current": r.current,
        "candidate": r.candidate,
        "steps": list(r.steps),
        "step": r.step,
        "percent": r.percent,
        "state": r.state.value,
        "margin": r.margin,
        "created": r.created,
        "updated": r.updated,
        "interval_s": r.interval_s,
        "next_step_at": r.step_started + r.interval_s if r.interval_s and r.state is State.CANARY else None,
    }


def _row(row: sa.Row) -> Rollout:
    return Rollout(
        id=row.id,
        tenant=row.tenant,
        alias=row.alias,
        current=row.current_ref,
        candidate=row.candidate,
        steps=parse_steps(row.steps),
        step=row.step,
        state=State(row.state),
        margin=row.margin,
        created=row.created,
        updated=row.updated,
        interval_s=row.interval_s,
        step_started=row.step_started or row.updated,
    )


def _reason(text: str | None) -> str:
    return (text or "").strip()[:MAX_REASON_CHARS]


_ACTIVE_ALL = sa.select(rollouts).where(_r.active == 1)


class RolloutStore:
    """Rollouts of the aliases in one tenant store (shares its database and change feed)."""

    def __init__(self, tenants: TenantStore) -> None:
        self.tenants = tenants
        self.db = tenants.db
        migrate(self.db, metadata, SCHEMA_VERSION, UPGRADES, key=SCHEMA_KEY)

    def data_version(self) -> int:
        """The tenant store's change probe (moves on any commit: a promote, a rollout step)."""
        return self.tenants.data_version()

    # -- reading ---------------------------------------------------------------------------------

    def active_all(self) -> dict[tuple[str, str], Rollout]:
        """(tenant, alias) -> its active rollout, for every alias that has one (the gateway's view)."""
        with self.db.read() as con:
            return {(r.tenant, r.alias): _row(r) for r in con.execute(_ACTIVE_ALL)}

    def get(self, rollout_id: int) -> Rollout:
        with self.db.read() as con:
            row = con.execute(sa.select(rollouts).where(_r.id == rollout_id)).first()
        if row is None:
            raise ServingError(f"no rollout {rollout_id}", kind=ErrorKind.NOT_FOUND)
        return _row(row)

    def latest(self, tenant: str, alias: str) -> tuple[Rollout, dict[str, Any] | None]:
        """The alias's newest rollout (active or not) and its evaluation result; NOT_FOUND if none."""
        with self.db.read() as con:
            row = con.execute(
                sa.select(rollouts)
                .where(_r.tenant == tenant, _r.alias == alias)
                .order_by(_r.id.desc())
                .limit(1)
            ).first()
        if row is None:
            raise ServingError(
                f"tenant {tenant!r} has no rollout of alias {alias!r}",
                hint="start one with `adapterhub tenant rollout TENANT ALIAS REF`",
                kind=ErrorKind.NOT_FOUND,
            )
        return _row(row), json.loads(row.eval_result) if row.eval_result else None

    def eval_set(self, rollout_id: int) -> list[dict[str, str]] | None:
        """The held-out set the rollout was started with (rerun before each advance), or None."""
        with self.db.read() as con:
            text = con.execute(sa.select(_r.eval_set).where(_r.id == rollout_id)).scalar()
        return json.loads(text) if text else None

    def history(self, tenant: str, alias: str | None = None, limit: int = MAX_HISTORY_ROWS) -> list[Event]:
        """The audit trail of one alias (or all of a tenant's), oldest first: rollout events, plus the
        alias moves made outside a rollout (`tenant promote`, which records no actor: shown as
        "promote")."""
        limit = max(1, min(limit, MAX_HISTORY_ROWS))
        q = sa.select(events).where(_e.tenant == tenant)
        h = alias_history.c
        moves = sa.select(h.at, h.alias, h.ref).where(h.tenant == tenant)
        if alias is not None:
            q = q.where(_e.alias == alias)
            moves = moves.where(h.alias == alias)
        with self.db.read() as con:
            ev_rows = con.execute(q.order_by(_e.id.desc()).limit(limit)).all()
            move_rows = con.execute(moves.order_by(h.id.desc()).limit(limit)).all()
        out = [
            Event(
                r.at,
                r.tenant,
                r.alias,
                r.rollout,
                r.action,
                r.ref,
                r.actor,
                r.reason,
                json.loads(r.detail) if r.detail else None,
            )
            for r in ev_rows
        ]
        # A rollout's own promotion is in both tables (same time, same ref): keep the audited one.
        audited = {(e.at, e.alias, e.ref) for e in out if e.action == "promoted"}
        out += [
            Event(
                m.at,
                tenant,
                m.alias,
                None,
                "alias-moved" if m.ref else "alias-removed",
                m.ref,
                "promote",
                "",
                None,
            )
            for m in move_rows
            if (m.at, m.alias, m.ref) not in audited
        ]
        out.sort(key=lambda e: e.at)
        return out[-limit:]

    # -- writing ---------------------------------------------------------------------------------

    def _audit(
        self,
        con: Connection,
        r: Rollout,
        action: str,
        actor: str,
        reason: str | None,
        ref: str | None = None,
        detail: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        con.execute(
            sa.insert(events).values(
                at=now or time.time(),
                tenant=r.tenant,
                alias=r.alias,
                rollout=r.id,
                action=action,
                ref=ref,
                actor=actor,
                reason=_reason(reason),
                detail=json.dumps(detail, sort_keys=True) if detail is not None else None,
            )
        )

    def start(
        self,
        tenant: str,
        alias: str,
        candidate: str,
        *,
        steps: str | tuple[int, ...] = "10,50,100",
        margin: float = 0.0,
        actor: str = "cli",
        reason: str | None = None,
        interval_s: float | None = None,
        eval_set: list[dict[str, str]] | None = None,
    ) -> Rollout:
        """Begin a rollout of `alias` towards the full reference `candidate`, in `pending-eval`: no
        traffic reaches the candidate until `record_eval` passes it. CONFLICT if one is active.
        With `interval_s`, each step advances on its own after that long (rollout_schedule.py);
        `eval_set` is kept so that each advance reruns the evaluation gate."""
        steps_t = parse_steps(steps)
        interval_s = parse_interval(interval_s)
        if not is_full_ref(candidate):
            raise ServingError(
                f"a rollout needs a full reference namespace/name@version, not {candidate!r}",
                kind=ErrorKind.INVALID,
            )
        if not (0.0 <= margin <= 1.0):
            raise ServingError(f"margin must be between 0 and 1, not {margin}", kind=ErrorKind.INVALID)
        now = time.time()
        a = aliases.c
        try:
            with self.db.write() as con:
                current = con.execute(
                    sa.select(a.ref).where(a.tenant == tenant, a.alias == alias).with_for_update()
                ).scalar()
                if current is None:
                    raise ServingError(
                        f"tenant {tenant!r} has no alias {alias!r} to roll out",
                        hint="create it first with `adapterhub tenant promote TENANT ALIAS REF`",
                        kind=ErrorKind.NOT_FOUND,
                    )
                if current == candidate:
                    raise ServingError(f"{alias} already points at {candidate}", kind=ErrorKind.CONFLICT)
                rid = con.execute(
                    sa.insert(rollouts)
                    .values(
                        tenant=tenant,
                        alias=alias,
                        current_ref=current,
                        candidate=candidate,
                        steps=",".join(map(str, steps_t)),
                        step=0,
                        state=State.PENDING_EVAL.value,
                        active=1,
                        margin=margin,
                        created=now,
                        updated=now,
                        interval_s=interval_s,
                        step_started=now,
                        eval_set=json.dumps(eval_set) if eval_set is not None else None,
                    )
                    .returning(_r.id)
                ).scalar_one()
                r = Rollout(
                    rid,
                    tenant,
                    alias,
                    current,
                    candidate,
                    steps_t,
                    0,
                    State.PENDING_EVAL,
                    margin,
                    now,
                    now,
                    interval_s,
                    now,
                )
                self._audit(
                    con,
                    r,
                    "started",
                    actor,
                    reason,
                    candidate,
                    {"current": current, "steps": list(steps_t), "margin": margin, "interval_s": interval_s},
                    now,
                )
                self.db.notify(con, CHANNEL)
        except exc.IntegrityError:
            raise ServingError(
                f"alias {alias!r} of tenant {tenant!r} already has a rollout in progress",
                hint="see it with `adapterhub tenant rollout status`; abort it first to start another",
                kind=ErrorKind.CONFLICT,
            ) from None
        return r

    def _transition(
        self,
        tenant: str,
        alias: str,
        change: Callable[[Rollout], Rollout],
        action: Callable[[Rollout, Rollout], str],
        actor: str,
        reason: str | None,
        *,
        rollout_id: int | None = None,
        at_step: int | None = None,
        detail: dict[str, Any] | None = None,
        eval_result: dict[str, Any] | None = None,
    ) -> Rollout:
        """Apply one state-machine step to the alias's active rollout (or `rollout_id`, if it is
        still the active one; and with `at_step`, only if it is still in that step and routing: a
        compare-and-set, so replicas acting on the same observation change it once), in one
        transaction with its audit row and change notification."""
        now = time.time()
        with self.db.write() as con:
            q = sa.select(rollouts).where(_r.tenant == tenant, _r.alias == alias, _r.active == 1)
            if rollout_id is not None:
                q = q.where(_r.id == rollout_id)
            row = con.execute(q.with_for_update()).first()
            if row is None:
                raise ServingError(
                    f"alias {alias!r} of tenant {tenant!r} has no rollout in progress"
                    + (f" (rollout {rollout_id} has ended)" if rollout_id is not None else ""),
                    hint="see `adapterhub tenant rollout status TENANT ALIAS`",
                    kind=ErrorKind.CONFLICT if rollout_id is not None else ErrorKind.NOT_FOUND,
                )
            before = _row(row)
            if at_step is not None and (before.step != at_step or before.state is not State.CANARY):
                raise ServingError(
                    f"rollout {before.id} of {tenant}/{alias} has moved on from step {at_step + 1} "
                    f"(it is {before.state.value}, step {before.step + 1})",
                    kind=ErrorKind.CONFLICT,
                )
            after = change(before)
            values: dict[str, Any] = {
                "state": after.state.value,
                "step": after.step,
                "active": int(after.state in ACTIVE),
                "updated": now,
                "step_started": after.step_started,
            }
            if eval_result is not None:
                values["eval_result"] = json.dumps(eval_result, sort_keys=True)
            if after.state is State.PROMOTED:
                self._move_alias(con, before, now)
            con.execute(sa.update(rollouts).where(_r.id == before.id).values(**values))
            name = action(before, after)
            ref = (
                after.candidate
                if after.state in (State.CANARY, State.PAUSED, State.PROMOTED)
                else after.current
            )
            self._audit(
                con,
                after,
                name,
                actor,
                reason,
                ref,
                {**(detail or {}), "state": after.state.value, "percent": after.percent},
                now,
            )
            self.db.notify(con, CHANNEL)
        return after

    def _move_alias(self, con: Connection, r: Rollout, now: float) -> None:
        a = aliases.c
        moved = con.execute(
            sa.update(aliases)
            .where(a.tenant == r.tenant, a.alias == r.alias, a.ref == r.current)
            .values(ref=r.candidate, updated=now)
        ).rowcount
        if moved != 1:
            raise ServingError(
                f"alias {r.alias!r} of tenant {r.tenant!r} no longer points at {r.current} (moved by hand "
                "during the rollout); not promoting",
                hint="abort this rollout and start a new one from the alias's current version",
                kind=ErrorKind.CONFLICT,
            )
        con.execute(sa.insert(alias_history).values(tenant=r.tenant, alias=r.alias, ref=r.candidate, at=now))

    def record_eval(
        self, tenant: str, alias: str, rollout_id: int, passed: bool, result: dict[str, Any], actor: str
    ) -> Rollout:
        """The evaluation gate's verdict: traffic starts at the first step, or the rollout is refused."""
        reason = result.get("reason") or ("evaluation gate passed" if passed else "evaluation gate failed")
        return self._transition(
            tenant,
            alias,
            (lambda r: r.eval_passed()) if passed else (lambda r: r.eval_failed()),
            lambda b, a: "eval-passed" if passed else "eval-refused",
            actor,
            reason,
            rollout_id=rollout_id,
            detail=result,
            eval_result=result,
        )

    def advance(
        self,
        tenant: str,
        alias: str,
        actor: str = "cli",
        reason: str | None = None,
        *,
        rollout_id: int | None = None,
        at_step: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Rollout:
        """The next step, or (after the last) promote: the alias moves to the candidate. With
        `rollout_id` and `at_step`, only from that step (CONFLICT if another replica got there first)."""
        return self._transition(
            tenant,
            alias,
            lambda r: r.advance(),
            lambda b, a: "promoted" if a.state is State.PROMOTED else "step",
            actor,
            reason or "advanced by operator",
            rollout_id=rollout_id,
            at_step=at_step,
            detail=detail,
        )

    def pause(self, tenant: str, alias: str, actor: str = "cli", reason: str | None = None) -> Rollout:
        return self._transition(
            tenant, alias, lambda r: r.pause(), lambda b, a: "paused", actor, reason or "paused by operator"
        )

    def resume(self, tenant: str, alias: str, actor: str = "cli", reason: str | None = None) -> Rollout:
        return self._transition(
            tenant,
            alias,
            lambda r: r.resume(),
            lambda b, a: "resumed",
            actor,
            reason or "resumed by operator",
        )

    def abort(self, tenant: str, alias: str, actor: str = "cli", reason: str | None = None) -> Rollout:
        """End the rollout; every request of the alias goes to the current version again."""
        return self._transition(
            tenant, alias, lambda r: r.abort(), lambda b, a: "aborted", actor, reason or "aborted by operator"
        )

    def roll_back(
        self,
        tenant: str,
        alias: str,
        rollout_id: int,
        reason: str,
        actor: str = "gate",
        detail: dict[str, Any] | None = None,
        at_step: int | None = None,
    ) -> Rollout:
        """A failing gate ends rollout `rollout_id` (only if it is still the active one, and with
        `at_step` only if it is still in the step the gate judged)."""
        return self._transition(
            tenant,
            alias,
            lambda r: r.roll_back(),
            lambda b, a: "rolled-back",
            actor,
            reason,
            rollout_id=rollout_id,
            at_step=at_step,
            detail=detail,
        )
