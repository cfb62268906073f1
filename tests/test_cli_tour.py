"""The tour's commands as a user types them: the installed `adapterhub` run as a subprocess, with its own
HOME, checking what the user sees (exit code, one-line errors, no traceback) and what it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ADAPTERHUB = str(Path(sys.executable).parent / "adapterhub")
EXAMPLE = Path(__file__).resolve().parents[1] / "adapters" / "capitals"


def run(args: list[str], home: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "HOME": str(home), **env}
    for name in ("ADAPTERHUB_REGISTRY", "ADAPTERHUB_TOKEN", "ADAPTERHUB_ADMIN_KEY"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        [ADAPTERHUB, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def one_error(result: subprocess.CompletedProcess) -> str:
    """The error a failed command printed: one `error:` line (and a hint), never a traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return result.stderr


def test_pack_to_a_name_ending_tar_writes_a_tar_archive(tiny_base, lora_dir, tmp_path):
    out = tmp_path / "geo.tar"
    r = run(["pack", lora_dir, "-o", out, "--base", tiny_base, "-n", "acme", "--name", "geo"], tmp_path / "h")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and tarfile.is_tarfile(out)  # `tar tf geo.tar` works
    with tarfile.open(out) as tar:
        assert any(name.endswith("manifest.json") for name in tar.getnames())
    verify = run(["verify", out, "--no-vllm"], tmp_path / "h")
    assert verify.returncode == 0 and "ok: acme/geo@0.1.0" in verify.stdout, verify.stderr


def test_resume_with_other_settings_is_refused_before_the_model_is_loaded(tmp_path):
    """The checkpoint's settings are checked first: the base here has unreadable weights, so any attempt
    to load it would fail with another error (which is what the command used to print, after loading)."""
    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.training import load_recipe

    base = tmp_path / "base"
    shutil.copytree(EMBEDDED_BASE_DIR, base)
    for weights in base.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    out = tmp_path / "run"
    made_with = load_recipe(
        EXAMPLE / "recipe.yaml", {"base": str(base), "method": "qlora", "output_dir": out}
    )
    step = out / "checkpoints" / "step-10"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 10, "settings": made_with.lora_settings()}))
    (step / "trainer_state.pt").write_bytes(b"")
    r = run(
        [
            "train",
            EXAMPLE / "recipe.yaml",
            "--base",
            base,
            "--method",
            "lora",
            "--output-dir",
            out,
            "--resume",
        ],
        tmp_path / "h",
    )
    err = one_error(r)
    assert "was made with other settings: method: 'qlora' -> 'lora'" in err


@pytest.mark.slow  # two CLI processes that each load the base model
def test_eval_shows_no_loader_bars(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join((EXAMPLE / "data.jsonl").read_text().splitlines(keepends=True)[:4]))
    r = run(["eval", "--data", data, "--no-exact-match"], tmp_path / "h")
    assert r.returncode == 0, r.stderr
    assert "base:" in r.stdout and "loss" in r.stdout
    assert "Loading weights" not in r.stderr, r.stderr
    verbose = run(["eval", "--data", data, "--no-exact-match", "--verbose"], tmp_path / "h")
    assert verbose.returncode == 0, verbose.stderr  # --verbose shows them again (where transformers has any)


def test_print_command_names_the_hub_token_and_never_prints_a_secret(tmp_path):
    secret, token = "ahadmin_do-not-print-me", "ahp_do-not-print-me-either"
    r = run(
        ["serve", "--registry", "http://hub.invalid:8080", "--print-command"],
        tmp_path / "h",
        ADAPTERHUB_ADMIN_KEY=secret,
        ADAPTERHUB_TOKEN=token,
    )
    assert r.returncode == 0, r.stderr
    assert 'ADAPTERHUB_TOKEN="$ADAPTERHUB_TOKEN"' in r.stdout
    assert 'ADAPTERHUB_ADMIN_KEY="$ADAPTERHUB_ADMIN_KEY"' in r.stdout
    assert secret not in r.stdout and token not in r.stdout
    assert "ADAPTERHUB_REGISTRY=http://hub.invalid:8080" in r.stdout
    local = run(["serve", "--registry", tmp_path / "reg", "--print-command"], tmp_path / "h")
    assert "ADAPTERHUB_TOKEN" not in local.stdout  # a local registry needs no hub token


def test_a_registry_set_once_is_the_registry_of_tenant_promote(tiny_base, lora_dir, tmp_path):
    """ADAPTERHUB_REGISTRY (the setting `serve` reads) is the registry every command uses; without it,
    a reference missing from the default registry says how to point the command at the server's."""
    home, reg, db = tmp_path / "h", tmp_path / "shared-registry", tmp_path / "tenants.db"
    bundle = tmp_path / "geo.tar"
    assert (
        run(
            ["pack", lora_dir, "-o", bundle, "--base", tiny_base, "-n", "acme", "--name", "geo"], home
        ).returncode
        == 0
    )
    published = run(["publish", bundle], home, ADAPTERHUB_REGISTRY=str(reg))
    assert published.returncode == 0, published.stderr
    assert run(["tenant", "add", "acme", "--db", db], home).returncode == 0
    missing = run(["tenant", "promote", "acme", "geo", "acme/geo@0.1.0", "--db", db], home)
    err = one_error(missing)
    assert "ADAPTERHUB_REGISTRY" in err
    promoted = run(
        ["tenant", "promote", "acme", "geo", "acme/geo@0.1.0", "--db", db], home, ADAPTERHUB_REGISTRY=str(reg)
    )
    assert promoted.returncode == 0, promoted.stderr
    assert "acme: geo -> acme/geo@0.1.0" in promoted.stdout


def test_publish_to_a_hub_does_not_suggest_base(tiny_base, lora_dir, tmp_path):
    from hub_fixtures import running_hub

    bundle = tmp_path / "geo.tar"
    home = tmp_path / "h"
    assert (
        run(
            ["pack", lora_dir, "-o", bundle, "--base", tiny_base, "-n", "acme", "--name", "geo"], home
        ).returncode
        == 0
    )
    with running_hub(tmp_path / "hubreg") as hub:
        r = run(
            ["publish", bundle, "--registry", hub.url], home, ADAPTERHUB_TOKEN=hub.token("acme", "publish")
        )
    assert r.returncode == 0, r.stderr
    assert "published acme/geo@0.1.0" in r.stdout
    assert "pass --base" not in r.stdout
    local = run(["publish", bundle, "--registry", tmp_path / "local"], home)
    assert "pass --base DIR" in local.stdout  # a local registry can check shapes: the hint stays there


@pytest.mark.parametrize("flag", ["--rate-limit-failure"])
def test_cluster_up_takes_the_documented_flags(tmp_path, flag):
    r = run(["cluster", "up", "--help"], tmp_path / "h")
    assert flag in r.stdout
    bad = run(["cluster", "up", flag, "sideways"], tmp_path / "h")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "sideways" in bad.stderr
