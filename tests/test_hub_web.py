"""The web catalog in a real browser: Debian's chromium driven by playwright, offline, on a loopback hub.

With ADAPTERHUB_UPDATE_SCREENSHOT=1 it also refreshes docs/hub-adapter-page.png (the adapter page);
otherwise the screenshot goes to the test's temp folder, so a test run leaves the checkout unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hub_fixtures import running_hub, with_loss_history

from adapterhub_lite.bundles import pack_bundle

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "hub-adapter-page.png"
HOSTILE = (
    'Evil card <script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> '
    "[click me](javascript:window.__pwned=3)"
)


@pytest.fixture(scope="module")
def hub(trained_dir, lora_dir, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-web")
    rich = with_loss_history(trained_dir, root / "rich")
    with running_hub(root / "registry", vllm_check=None) as h:  # vLLM's validator on, as in production
        acme = h.client("acme", "publish")
        for v in ("1.0.0", "1.1.0"):
            acme.publish(
                pack_bundle(
                    rich,
                    root / f"geo-{v}.tar",
                    namespace="acme",
                    name="geo",
                    version=v,
                    base_dir=tiny_base,
                    description="Capitals of the world, **in bold**.",
                    tags=["geo"],
                    archive=True,
                    vllm_check=False,
                )
            )
        acme.yank("acme/geo@1.0.0", reason="superseded")
        acme.set_public("acme/geo")
        acme.publish(
            pack_bundle(
                lora_dir,
                root / "secret.tar",
                namespace="acme",
                name="secret-plans",
                version="1.0.0",
                base_dir=tiny_base,
                description="geo but private",
                archive=True,
                vllm_check=False,
            )
        )
        acme.publish(
            pack_bundle(
                lora_dir,
                root / "evil.tar",
                namespace="acme",
                name="evil",
                version="1.0.0",
                base_dir=tiny_base,
                description=HOSTILE,
                archive=True,
                vllm_check=False,
            )
        )
        acme.set_public("acme/evil")
        yield h


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1100, "height": 1400})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors
        yield pg
        browser.close()


def test_search_finds_the_adapter_and_hides_the_private_one(hub, page):
    page.goto(hub.url + "/")
    page.fill("input[name=q]", "geo")
    page.click("button[type=submit]")
    links = page.locator("table.results a").all_inner_texts()
    assert links == ["acme/geo"]  # "acme/secret-plans" matches "geo" too, but is private
    page.click("text=acme/geo")
    assert page.url == hub.url + "/acme/geo"


def test_adapter_page_shows_card_versions_plot_and_facts(hub, page, tmp_path):
    page.goto(hub.url + "/acme/geo")
    body = page.inner_text("body")
    assert "Capitals of the world" in page.inner_text(".card")
    assert page.locator(".card strong").first.inner_text() == "in bold"  # markdown rendered
    versions = page.locator("tr.version").all_inner_texts()
    assert len(versions) == 2 and "1.1.0" in versions[0] and "yanked" in versions[1]
    assert page.locator("svg.loss-curve polyline").count() == 1
    assert page.locator("svg.loss-curve").bounding_box()["width"] > 300
    assert "tiny-test-base" in body and "sha256:" in page.inner_text("code.fingerprint")
    assert page.inner_text("td.license") == "apache-2.0"
    assert "unsigned" in page.inner_text("td.signature")
    gains = page.locator("td.gain").all_inner_texts()
    assert "2" in gains  # the held-out loss gain recorded in training_record.json
    assert f"adapterhub pull acme/geo@1.1.0 --registry {hub.url}" in page.inner_text("pre.commands")
    shot = tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ADAPTERHUB_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_private_adapter_is_absent_for_anonymous_visitors(hub, page):
    r = page.goto(hub.url + "/acme/secret-plans")
    assert r.status == 404
    missing = page.goto(hub.url + "/acme/no-such-thing")
    assert missing.status == 404
    page.goto(hub.url + "/acme")
    assert "secret-plans" not in page.inner_text("body")
    page.goto(hub.url + "/?q=private")
    assert "secret-plans" not in page.content()


def test_card_with_script_runs_nothing(hub, page):
    page.goto(hub.url + "/acme/evil")
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".card script").count() == 0 and page.locator(".card img").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    assert "<script>" in page.inner_text(".card")  # shown as text
    page.click("text=click me") if page.locator("a:has-text('click me')").count() else None
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []
