"""The documentation stays true: the site builds strictly, its generated reference covers the code, the
README is a front door, no absolute machine path is committed, and the tutorials' code blocks run.

The tutorials run through a small runner of our own rather than mktestdocs or pytest-markdown-docs: those
run each block in a process of its own, and a tutorial is one shell session (a variable exported in one
block is read by the next, a server started in one block answers the next). Each page runs in a scratch
folder with its own HOME, so nothing touches the user's ~/.adapterhub. A block preceded by
`<!-- docs-test: skip (why) -->` is not run; one preceded by `<!-- docs-test: background URL -->` is
started in the background and waited for until URL answers 200, then stopped (SIGTERM) when the page ends.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO / "scripts"))

import gen_reference  # noqa: E402  (scripts/ is not a package)

# An absolute path of a machine: /tmp/, /work/, /home/, /root/ not preceded by a path character.
ABSOLUTE = r"(^|[^[:alnum:]_./$-])/(tmp|work|home|root)/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the site ------------------------------------------------------------------------------------------


def test_mkdocs_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = tmp_path / "site"
    # The generated pages are in the site, and the plots come from benchmarks/results/.
    for page in gen_reference.PAGES:
        assert (site / page).with_suffix(".html").is_file(), page
    plot = REPO / "benchmarks" / "results" / "serving.png"
    assert (site / "results" / "serving.png").read_bytes() == plot.read_bytes()
    # Every page in docs/ is in the nav (mkdocs only warns about omitted files at INFO level).
    nav = (REPO / "mkdocs.yml").read_text()
    for md in DOCS.rglob("*.md"):
        assert md.relative_to(DOCS).as_posix() in nav, f"{md.relative_to(REPO)} is not in mkdocs.yml's nav"


def test_cli_reference_has_every_command_and_option():
    import typer

    from cli.main import COMMANDS, app

    page = gen_reference.cli_page()
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="adapterhub")
    for name in COMMANDS:
        assert f"`adapterhub {name}`" in page, name
        cmd = root.get_command(ctx, name)
        for param in cmd.get_params(ctx):
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert f"{opt} " in page or f"{opt}`" in page or f"{opt}," in page, f"{name} {opt}"


def test_settings_reference_has_every_variable_the_code_names():
    names = set()
    for path in [*(REPO / "adapterhub_lite").rglob("*.py"), *(REPO / "cli").rglob("*.py")]:
        names |= set(re.findall(r"\bADAPTERHUB_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    page = gen_reference.settings_page()
    assert names and all(f"`{n}`" in page for n in names), sorted(n for n in names if f"`{n}`" not in page)


def test_bundle_reference_is_the_manifest_schema():
    import json

    from adapterhub_lite.bundles.manifest import Manifest

    page = gen_reference.bundle_page()
    schema = json.loads(page.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert schema == Manifest.model_json_schema()
    assert all(f"| `{field}` |" in page for field in Manifest.model_fields)


def test_metrics_reference_has_every_metric():
    from prometheus_client import CollectorRegistry

    from adapterhub_lite.serving.gateway.metrics import ServingMetrics

    reg = CollectorRegistry()
    ServingMetrics(reg)
    page = gen_reference.metrics_page()
    families = list(reg.collect())
    assert families and all(f"`{f.name}" in page for f in families)


def test_hub_api_reference_has_every_route():
    app = gen_reference._hub_app()
    page = gen_reference.hub_api_page()
    paths = [r.path for r in app.routes if getattr(r, "path", None)]
    assert paths and all(f"`{p}`" in page or f"{p}" in page for p in paths)


# --- the README ----------------------------------------------------------------------------------------


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """(directive, language, code) of every fenced block; the directive is a `docs-test:` comment above it."""
    pattern = re.compile(
        r"(?:<!--\s*docs-test:\s*(?P<directive>[^\n]*?)\s*-->\s*\n)?^```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^```",
        re.S | re.M,
    )
    return [(m["directive"] or "", m["lang"], m["code"]) for m in pattern.finditer(text)]


def test_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"
    # The tour is the first tutorial's path: its commands and its client are the tutorial's.
    tutorial = (DOCS / "tutorials" / "first-adapter.md").read_text()
    bash = [code for _, lang, code in _blocks(text) if lang == "bash"]
    tour = [ln.split("#")[0].strip() for code in bash for ln in code.splitlines()]
    for line in filter(None, tour):
        if line.startswith(("adapterhub", "export")):
            assert line in tutorial, f"README's tour runs `{line}`, which the tested tutorial does not"
    readme_py = [code for _, lang, code in _blocks(text) if lang == "python"]
    tutorial_py = [code for _, lang, code in _blocks(tutorial) if lang == "python"]
    assert [c.replace("# ask.py\n", "") for c in readme_py] == tutorial_py


def test_no_absolute_machine_path_is_committed():
    done = subprocess.run(
        ["git", "grep", "-nE", ABSOLUTE, "--", ".", ":!tests"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 1, f"absolute machine paths:\n{done.stdout[:3000]}"


# --- the tutorials' blocks -----------------------------------------------------------------------------

WAIT = """python - "$1" "$2" <<'AHL_DOCS_WAIT'
import sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 900
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=5).status == 200:
            sys.exit(0)
    except OSError:
        pass
    try:
        import os; os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"the background command exited before {url} answered")
    time.sleep(0.5)
sys.exit(f"{url} did not answer in time")
AHL_DOCS_WAIT"""


def page_script(text: str) -> str:
    """One bash script running a page's bash and python blocks in order, in one session."""
    lines = [
        "set -euo pipefail",
        "pids=()",
        'stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait || true; }',
        "trap stop EXIT",
        f"wait_for() {{\n{WAIT}\n}}",
    ]
    for n, (directive, lang, code) in enumerate(_blocks(text)):
        if directive.startswith("skip") or lang not in ("bash", "python"):
            continue
        if lang == "python":
            lines.append(f"python - <<'AHL_DOCS_PY'\n{code}AHL_DOCS_PY")
        elif directive.startswith("background"):
            url = directive.split()[1]
            lines.append(f"( {code.strip()} ) > background-{n}.log 2>&1 &\npids+=($!)")
            lines.append(f'wait_for {url} "$!" || {{ tail -n 40 background-{n}.log; exit 1; }}')
        else:
            lines.append(code)
    return "\n".join(lines) + "\n"


def run_page(page: str, tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    text = (DOCS / page).read_text()
    for port in ("8000", "8080"):  # the pages name the default ports; the test takes free ones
        free = _free_port()
        text = text.replace(f":{port}", f":{free}").replace(f"--port {port}", f"--port {free}")
    work = tmp_path / "work"
    (work / "home").mkdir(parents=True)
    (work / "adapters").symlink_to(REPO / "adapters")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERHUB_")}
    env.update(
        HOME=str(work / "home"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        TMPDIR=str(tmp_path),
    )
    script = work / "page.sh"
    script.write_text(page_script(text))
    proc = subprocess.Popen(
        ["bash", str(script)], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert done.returncode == 0, f"{page}:\n{out[-3000:]}\n{err[-5000:]}"
    return done


def test_page_script_runs_blocks_in_one_session(tmp_path):
    """The runner itself: state carries from block to block, skipped blocks do not run, and a failing
    block fails the page."""
    page = (
        "```bash\nexport GREETING=hello\n```\n\n<!-- docs-test: skip (not here) -->\n```bash\nexit 3\n```\n\n"
        "```python\nimport os\nprint(os.environ['GREETING'], 'from python')\n```\n"
    )
    done = subprocess.run(["bash", "-c", page_script(page)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "hello from python", done.stderr
    failing_page = page_script("```bash\nfalse\necho after\n```\n")
    failing = subprocess.run(["bash", "-c", failing_page], capture_output=True)
    assert failing.returncode != 0 and b"after" not in failing.stdout


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.e2e
def test_tutorial_first_adapter_end_to_end(tmp_path):
    done = run_page("tutorials/first-adapter.md", tmp_path, timeout=1500)
    # The last block is the tenant's call through the openai client: it prints the held-out capital.
    assert done.stdout.strip().splitlines()[-1] == "Lima", done.stdout[-2000:]


@pytest.mark.slow
def test_tutorial_your_own_data(tmp_path):
    run_page("tutorials/your-model-and-data.md", tmp_path, timeout=900)
    assert (tmp_path / "work" / "runs" / "my-adapter" / "training_record.json").is_file()


@pytest.mark.slow
def test_tutorial_hub_for_your_team(tmp_path):
    run_page("tutorials/hub-for-your-team.md", tmp_path, timeout=900)
    assert (tmp_path / "work" / "pulled" / "manifest.json").is_file()


@pytest.mark.slow
def test_tutorial_past_one_machine(tmp_path):
    run_page("tutorials/past-one-machine.md", tmp_path, timeout=900)
    assert (tmp_path / "work" / "runs" / "capitals-ddp" / "training_record.json").is_file()


def test_benchmark_provenance_names_no_absolute_path(tmp_path, monkeypatch):
    import tempfile

    from benchmarks.provenance import command, provenance, relative

    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.setenv("ADAPTERHUB_BENCH_QUIET", "1")
    argv = [
        str(REPO / "benchmarks" / "serving_bench.py"),
        "--workdir", str(tmp_path / "t" / "work"),
        f"--out={REPO / 'benchmarks' / 'results' / 'x.json'}",
        "--base", str(tmp_path / "h" / "models" / "m"),
        "--quick",
    ]
    assert command(argv) == (
        "ADAPTERHUB_BENCH_QUIET=1 .venv/bin/python benchmarks/serving_bench.py --workdir '$TMPDIR/work' "
        "--out=benchmarks/results/x.json --base '~/models/m' --quick"
    )
    assert relative("/srv/data/file.bin") == "<outside the repository>/file.bin"
    record = provenance()
    assert len(record["commit"]) == 12 and record["machine"]["cores"] >= 1
    assert len(record["machine"]["load_average"]) == 3 and record["machine"]["cpu_model"]


def test_hub_api_reference_prefers_an_openapi_document(monkeypatch):
    """When the hub serves an OpenAPI document, the page is made from it rather than from the routes."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    paths = {"/api/v1/search": {"get": {"summary": "Find"}}}
    doc = {"openapi": "3.1.0", "info": {"title": "hub"}, "paths": paths}
    app = Starlette(routes=[Route("/api/v1/openapi.json", lambda request: JSONResponse(doc))])
    monkeypatch.setattr(gen_reference, "_hub_app", lambda: app)
    page = gen_reference.hub_api_page()
    assert "## `GET /api/v1/search`" in page and "Find" in page and "route table" not in page
