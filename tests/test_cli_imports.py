"""The short commands stay short: `pack`, `verify` and `base info` import no ML framework, no vLLM and
nothing of the server, and the lazy command table in cli/main.py matches what the modules register.

Timings live in benchmarks/cli_latency_bench.py; here only what each command imports is checked (in a
fresh interpreter, as a user runs it), which is what decides its wait.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import COMMANDS, module_commands

# Each of these costs seconds to import (torch alone 2-10 s on a loaded 2-core machine).
HEAVY = ("torch", "transformers", "peft", "vllm", "accelerate", "bitsandbytes", "datasets", "ray")
# The server, the database layer and the hub client: not needed to look at a base or a bundle.
UNRELATED = ("adapterhub_lite.serving", "adapterhub_lite.db", "sqlalchemy", "psycopg", "httpx")

_RUN = """
import json, sys
from cli.main import app
try:
    app(sys.argv[2:], prog_name="adapterhub")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def _run(tmp_path: Path, *args: str) -> set[str]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(report), *args], capture_output=True, text=True, timeout=120
    )
    data = json.loads(report.read_text())
    assert data["code"] in (0, None), proc.stderr
    return set(data["modules"])


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_pack_and_verify_with_vllms_check_import_no_framework(trained_dir, tiny_base, tmp_path):
    bundle = tmp_path / "b.bundle"
    # As `adapterhub train` leaves it: the training record names the base (fingerprinted, shapes checked).
    packed = _run(tmp_path, "pack", str(trained_dir), "-o", str(bundle), "--json")
    assert bundle.is_dir()
    verified = _run(tmp_path, "verify", str(bundle), "--base", str(tiny_base), "--json")
    for modules in (packed, verified):
        assert _loaded(modules, HEAVY + UNRELATED) == []
        # vLLM's own check ran (from its source), and the values were scanned with numpy.
        assert "adapterhub_lite.vllm_compat.peft" in modules and "numpy" in modules


def test_base_info_imports_only_the_tokenizer_library(tmp_path):
    modules = _run(tmp_path, "base", "info", "--json")
    assert _loaded(modules, HEAVY + UNRELATED) == []
    assert "tokenizers" in modules  # the usable-tokenizer check really loads it


def test_command_table_matches_what_each_module_registers():
    registered = {}
    for module in sorted(set(COMMANDS.values())):
        for name in module_commands(module):
            assert name not in registered, f"{name} registered twice"
            registered[name] = module
    assert registered == COMMANDS


def test_help_lists_every_command_and_an_unknown_one_is_refused():
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    listed = [line.split()[1] for line in result.output.splitlines() if line.startswith("│ ")]
    assert [n for n in listed if n in COMMANDS] == list(COMMANDS)
    result = runner.invoke(app, ["pak"])
    assert result.exit_code == 2 and "pack" in result.output


@pytest.mark.parametrize("name", ["base", "keys"])
def test_a_group_runs_through_the_lazy_table(name):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
