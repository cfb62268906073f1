"""Rollouts in a real tenant store: SQLite (the default) and a throwaway PostgreSQL server."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.tenants.rollout import State
from adapterhub_lite.tenants.rollout_store import SCHEMA_KEY, RolloutStore
from adapterhub_lite.tenants.store import TenantStore

V1, V2, V3 = "acme/bot@1.0.0", "acme/bot@2.0.0", "acme/bot@3.0.0"


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "tenants.db")
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def stores(location):
    tenants = TenantStore.open(location)
    tenants.add_tenant("acme")
    tenants.set_alias("acme", "bot", V1)
    store = RolloutStore(tenants)
    yield tenants, store
    tenants.close()


def test_rollout_to_promotion_moves_the_alias_and_audits_every_step(stores):
    tenants, store = stores
    r = store.start("acme", "bot", V2, steps="10,100", margin=0.05, actor="cli", reason="new data")
    assert r.state is State.PENDING_EVAL and store.active_all()[("acme", "bot")].percent == 0
    r = store.record_eval("acme", "bot", r.id, True, {"current": 0.8, "candidate": 0.85}, actor="cli")
    assert r.percent == 10 and tenants.aliases("acme")["bot"] == V1  # the alias stays until promotion
    assert store.advance("acme", "bot", actor="admin:ab12").percent == 100
    r = store.advance("acme", "bot", actor="admin:ab12", reason="looks good")
    assert r.state is State.PROMOTED
    assert tenants.aliases("acme")["bot"] == V2 and store.active_all() == {}
    assert tenants.alias_history("acme", "bot")[-1][1] == V2
    trail = [(e.action, e.actor) for e in store.history("acme", "bot")]
    assert trail == [
        ("alias-moved", "promote"),  # the alias's creation, by `tenant promote`
        ("started", "cli"),
        ("eval-passed", "cli"),
        ("step", "admin:ab12"),
        ("promoted", "admin:ab12"),
    ]
    assert store.history("acme", "bot")[-1].reason == "looks good"
    latest, result = store.latest("acme", "bot")
    assert latest.state is State.PROMOTED and result == {"current": 0.8, "candidate": 0.85}


def test_one_active_rollout_per_alias_and_refusals(stores):
    tenants, store = stores
    r = store.start("acme", "bot", V2)
    with pytest.raises(ServingError) as e:
        store.start("acme", "bot", V3)
    assert e.value.kind is ErrorKind.CONFLICT
    with pytest.raises(ServingError) as e:
        store.advance("acme", "bot")  # pending-eval: no traffic has been approved yet
    assert e.value.kind is ErrorKind.CONFLICT
    store.record_eval("acme", "bot", r.id, False, {"reason": "eval: 0.1 < 0.8 - 0.0"}, actor="cli")
    latest, _ = store.latest("acme", "bot")
    assert latest.state is State.ROLLED_BACK and store.active_all() == {}
    assert store.history("acme", "bot")[-1].reason == "eval: 0.1 < 0.8 - 0.0"
    # ended: a new one may start; a gate's late verdict on the old one changes nothing
    r2 = store.start("acme", "bot", V3)
    store.record_eval("acme", "bot", r2.id, True, {}, actor="cli")
    with pytest.raises(ServingError) as e:
        store.roll_back("acme", "bot", r.id, "late")
    assert e.value.kind is ErrorKind.CONFLICT and store.active_all()[("acme", "bot")].id == r2.id
    for bad in [("acme", "nope", V2), ("acme", "bot", "acme/bot"), ("acme", "bot", V1)]:
        with pytest.raises(ServingError):
            store.start(*bad)


def test_rollback_and_abort_keep_the_alias_and_notify_readers(stores):
    tenants, store = stores
    r = store.start("acme", "bot", V2)
    store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    rb = store.roll_back("acme", "bot", r.id, "live gate: 5/5 failed", detail={"failed": 5})
    assert rb.state is State.ROLLED_BACK and tenants.aliases("acme")["bot"] == V1
    ev = store.history("acme", "bot")[-1]
    assert (ev.action, ev.actor, ev.ref, ev.detail["failed"]) == ("rolled-back", "gate", V1, 5)
    r = store.start("acme", "bot", V3)
    store.abort("acme", "bot", actor="admin:ff00")
    assert store.latest("acme", "bot")[0].state is State.ABORTED
    # another connection's reader sees the change through the change feed, as it sees a promote
    other = TenantStore.open(tenants.db.path or tenants.db.url.render_as_string(hide_password=False))
    try:
        v = other.data_version()
        store.start("acme", "bot", V2)
        _wait(lambda: other.data_version() != v)
        assert RolloutStore(other).active_all()[("acme", "bot")].candidate == V2
    finally:
        other.close()


def test_promotion_refused_when_the_alias_was_moved_by_hand(stores):
    tenants, store = stores
    r = store.start("acme", "bot", V2, steps="100")
    store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    tenants.set_alias("acme", "bot", V3)
    with pytest.raises(ServingError) as e:
        store.advance("acme", "bot")
    assert e.value.kind is ErrorKind.CONFLICT and tenants.aliases("acme")["bot"] == V3
    assert store.active_all()[("acme", "bot")].state is State.CANARY  # nothing half-written


def test_schema_is_versioned_under_its_own_key(stores):
    tenants, _ = stores
    with tenants.db.read() as con:
        rows = dict(con.execute(sa.text("SELECT key, value FROM meta")).all())
    assert rows[SCHEMA_KEY] == "2" and rows["schema_version"] == "2"
    RolloutStore(tenants)  # reopening is a no-op


def test_a_version_1_rollout_table_is_upgraded_in_place(tmp_path):
    """A store made before steps had a schedule: its rollout (and its state) survive the upgrade."""
    db = tmp_path / "old.db"
    tenants = TenantStore.open(db)
    tenants.add_tenant("acme")
    tenants.set_alias("acme", "bot", V1)
    store = RolloutStore(tenants)
    r = store.start("acme", "bot", V2, steps="10,100")
    store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    with tenants.db.write() as con:  # back to version 1: its table had none of the new columns
        for column in ("interval_s", "step_started", "eval_set"):
            con.execute(sa.text(f"ALTER TABLE rollouts DROP COLUMN {column}"))
        con.execute(sa.text("UPDATE meta SET value = '1' WHERE key = :k"), {"k": SCHEMA_KEY})
    tenants.close()
    tenants = TenantStore.open(db)
    store = RolloutStore(tenants)
    (again,) = store.active_all().values()
    assert (again.id, again.percent, again.interval_s) == (r.id, 10, None)
    assert again.step_started == again.updated and store.eval_set(r.id) is None
    assert store.advance("acme", "bot", rollout_id=r.id, at_step=0).percent == 100
    tenants.close()


def test_advance_from_a_step_is_a_compare_and_set(stores):
    _, store = stores
    r = store.start(
        "acme", "bot", V2, steps="10,50,100", interval_s="5m", eval_set=[{"prompt": "a", "completion": "b"}]
    )
    assert r.interval_s == 300.0 and store.eval_set(r.id) == [{"prompt": "a", "completion": "b"}]
    r = store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    assert store.advance("acme", "bot", "schedule", rollout_id=r.id, at_step=0).step == 1
    with pytest.raises(ServingError) as e:  # a second replica acting on the same view: refused
        store.advance("acme", "bot", "schedule", rollout_id=r.id, at_step=0)
    assert e.value.kind is ErrorKind.CONFLICT and "moved on from step 1" in e.value.message
    with pytest.raises(ServingError) as e:  # nor may a stale failing gate roll back a later step
        store.roll_back("acme", "bot", r.id, "stale", at_step=0)
    assert e.value.kind is ErrorKind.CONFLICT
    latest, _ = store.latest("acme", "bot")
    assert (latest.state, latest.step) == (State.CANARY, 1)
    assert [e.action for e in store.history("acme", "bot")].count("step") == 1


def _wait(cond, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)
