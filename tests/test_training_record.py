"""The per-step training loss: bounded in the training record, carried by the bundle, plotted by the hub."""

from __future__ import annotations

import pytest

from adapterhub_lite.training.record import MAX_LOSS_POINTS, loss_points


def test_loss_points_keep_short_runs_whole_and_thin_long_ones_evenly():
    short = [(s, 1.0 / s) for s in range(1, 51)]
    assert loss_points(short) == [[s, float(f"{1.0 / s:.5g}")] for s in range(1, 51)]
    long = [(s, 3.0 - s * 1e-5) for s in range(1, 250_001)]
    kept = loss_points(long)
    assert len(kept) == MAX_LOSS_POINTS
    assert kept[0][0] == 1 and kept[-1][0] == 250_000  # the first and the last step always
    gaps = {b[0] - a[0] for a, b in zip(kept, kept[1:], strict=False)}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced (rounding moves a step by one at most)
    assert loss_points(long, limit=2) == [[1, 3.0], [250_000, 0.5]]
    with pytest.raises(ValueError):
        loss_points(long, limit=1)


@pytest.mark.slow  # trains the capitals example (shared session fixture)
def test_trained_adapter_carries_its_loss_curve_to_the_hub_page(
    capitals_lora, trained_dir, tiny_base, tmp_path
):
    from starlette.testclient import TestClient

    from adapterhub_lite.bundles import pack_bundle, verify_bundle
    from adapterhub_lite.hub import HubConfig, create_app
    from adapterhub_lite.registry import open_registry

    record = capitals_lora.record
    steps = record["recipe"]["max_steps"] if "max_steps" in record.get("recipe", {}) else None
    losses = record["losses"]
    assert 2 <= len(losses) <= MAX_LOSS_POINTS
    assert [s for s, _ in losses] == sorted({s for s, _ in losses})
    assert losses[-1][1] == pytest.approx(record["final_train_loss"], rel=1e-4)  # 5 significant digits
    if steps is not None and steps <= MAX_LOSS_POINTS:
        assert len(losses) == steps
    bundle = pack_bundle(
        capitals_lora.output_dir, tmp_path / "cap", namespace="acme", name="cap", version="1.0.0"
    )
    assert verify_bundle(bundle, vllm_check=False).training["losses"] == losses

    old = pack_bundle(  # a bundle from before per-step losses were recorded
        trained_dir,
        tmp_path / "old",
        namespace="acme",
        name="old",
        version="1.0.0",
        base_dir=tiny_base,
        vllm_check=False,
    )
    assert "losses" not in (verify_bundle(old, vllm_check=False).training or {})
    registry = open_registry(tmp_path / "registry")
    for b in (bundle, old):
        registry.publish(b)
    registry.set_public("acme/cap")
    registry.set_public("acme/old")
    with TestClient(create_app(registry, HubConfig(state_dir=tmp_path / "state", vllm_check=False))) as c:
        page = c.get("/acme/cap")
        assert page.status_code == 200
        assert "training loss per step" in page.text and "<polyline" in page.text
        legacy = c.get("/acme/old")
        assert legacy.status_code == 200 and "no per-step history recorded" in legacy.text
