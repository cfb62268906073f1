"""Hostile bundles: each case an attacker could build is refused with one line naming the file and field.

Every bundle here is made by packing a real PEFT adapter and then changing one thing the way an attacker
would (the manifest, card and hashes rewritten consistently where the attack needs it), so each test
reaches the check it is about rather than failing earlier on a hash.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import bundle_fixtures as fx
import pytest

from adapterhub_lite.bundles import TrustedKey, check_bundle, pack_bundle, sign_bundle, trusted_key
from adapterhub_lite.bundles.signing import generate_key, load_public_key
from adapterhub_lite.errors import AdapterHubError, BundleError, ErrorKind

PACK = dict(version="1.0.0", vllm_check=False)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = exc.value.message
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_CONFIG_DIR", str(tmp_path / "cfg"))
    return generate_key("alice"), generate_key("bob")


# ------------------------------------------------------------------ namespace-bound keys
def test_a_key_trusted_for_one_namespace_cannot_vouch_for_another(keys, lora_dir, tiny_base, tmp_path):
    alice, bob = keys
    acme = pack_bundle(lora_dir, tmp_path / "acme", namespace="acme", name="geo", base_dir=tiny_base, **PACK)
    sign_bundle(acme, "bob")  # bob is trusted, but only for globex
    trusted = [trusted_key(alice.public_key, ["acme"]), trusted_key(bob.public_key, ["globex"])]
    with pytest.raises(BundleError) as exc:
        check_bundle(acme, trusted_keys=trusted, vllm_check=False)
    msg = _one_line(exc)
    assert "not trusted for namespace 'acme'" in msg and bob.key_id in msg and "globex" in msg
    sign_bundle(acme, "alice")  # now also signed by acme's key: accepted
    assert check_bundle(acme, trusted_keys=trusted, vllm_check=False).signers == sorted(
        [alice.key_id, bob.key_id]
    )


def test_unscoped_keys_are_read_as_before(keys, lora_dir, tiny_base, tmp_path):
    alice, _ = keys
    b = pack_bundle(lora_dir, tmp_path / "b", namespace="anyone", name="geo", base_dir=tiny_base, **PACK)
    sign_bundle(b, "alice")
    for legacy in (alice.public_key, "alice", {"public_key": alice.public_key, "namespaces": None}):
        assert check_bundle(b, trusted_keys=[legacy], vllm_check=False).signers == [alice.key_id]
    scoped = trusted_key({"public_key": alice.public_key, "namespaces": ["acme"]})
    assert scoped == TrustedKey(load_public_key(alice.public_key), frozenset({"acme"}))
    assert trusted_key(scoped.to_json()) == scoped
    with pytest.raises(BundleError, match="not trusted for namespace 'anyone'"):
        check_bundle(b, trusted_keys=[scoped], vllm_check=False)
    for bad in ({"public_key": alice.public_key, "namespaces": "acme"}, {"key": "x"}):
        with pytest.raises(BundleError, match="trusted key entry"):
            trusted_key(bad)
    with pytest.raises(BundleError, match="invalid namespace"):
        trusted_key(alice.public_key, ["../acme"])


# ------------------------------------------------------------------ helpers
@pytest.fixture
def bundle(lora_dir, tiny_base, tmp_path) -> Path:
    return pack_bundle(lora_dir, tmp_path / "b", namespace="acme", name="geo", base_dir=tiny_base, **PACK)


def _config(bundle: Path) -> dict:
    return json.loads((bundle / "adapter_config.json").read_text())


def _with_config(bundle: Path, **changes) -> Path:
    cfg = {**_config(bundle), **changes}
    return fx.reseal(bundle, {"adapter_config.json": json.dumps(cfg).encode()})


def _poisoned_weights(src: Path, value: float, tensor: str = "lora_B") -> bytes:
    from safetensors.torch import load_file, save

    weights = load_file(src / "adapter_model.safetensors")
    name = sorted(n for n in weights if tensor in n)[0]
    weights[name] = weights[name].clone()
    weights[name][0, 0] = value
    return save(weights, metadata={"format": "pt"})


def _refused(path: Path, match: str, **kw) -> str:
    with pytest.raises(BundleError) as exc:
        check_bundle(path, vllm_check=False, **kw)
    msg = _one_line(exc)
    assert re.search(match, msg), msg
    return msg


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_by_verify_pack_and_publish(value, bundle, lora_dir, tiny_base, tmp_path):
    from adapterhub_lite.registry import open_registry

    fx.reseal(bundle, {"adapter_model.safetensors": _poisoned_weights(bundle, value)})
    _refused(bundle, r"adapter_model\.safetensors: tensor '.*lora_B.weight' holds non-finite values")
    # pack refuses the same adapter directory, and leaves nothing behind
    src = tmp_path / "src"
    shutil.copytree(lora_dir, src)
    (src / "adapter_model.safetensors").write_bytes(_poisoned_weights(lora_dir, value))
    with pytest.raises(BundleError, match="non-finite"):
        pack_bundle(src, tmp_path / "out", namespace="acme", name="x", base_dir=tiny_base, **PACK)
    with pytest.raises(BundleError, match="non-finite"):
        pack_bundle(
            src, tmp_path / "out.tar", namespace="acme", name="x", base_dir=tiny_base, archive=True, **PACK
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "src"]
    # publish (which verifies) refuses it; the registry stays empty
    reg = open_registry(tmp_path / "reg")
    with pytest.raises(AdapterHubError, match="non-finite"):
        reg.publish(bundle)
    assert reg.search() == [] and not any(p.is_file() for p in (tmp_path / "reg" / "blobs").rglob("*"))


def test_absurd_magnitudes_are_flagged_not_refused(bundle):
    fx.reseal(bundle, {"adapter_model.safetensors": _poisoned_weights(bundle, 3e4)})
    result = check_bundle(bundle, vllm_check=False)
    assert len(result.warnings) == 1 and "holds values up to 3e+04" in result.warnings[0]


def test_value_scan_handles_every_float_dtype_and_chunk_boundary():
    import torch
    from safetensors.torch import save

    from adapterhub_lite.bundles.tensors import parse_header
    from adapterhub_lite.bundles.values import ValueScan

    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for bad in (None, float("nan"), float("-inf")):
            t = torch.full((5, 7), -2.5, dtype=dtype)
            if bad is not None:
                t[4, 6] = bad
            data = save({"base_model.model.x.lora_A.weight": t, "base_model.model.x.lora_B.weight": t * 0})
            tensors, _ = parse_header(data, len(data), "f")
            n = int.from_bytes(data[:8], "little")
            for chunk in (1, 3, 7, len(data)):  # boundaries inside values
                scan = ValueScan(tensors, 8 + n, "f")
                try:
                    for i in range(0, len(data), chunk):
                        scan.update(memoryview(data)[i : i + chunk])
                    report = scan.finish()
                except BundleError as exc:
                    assert bad is not None and "non-finite" in exc.message
                else:
                    assert bad is None and report.absurd == [], (dtype, chunk)
    # the dot-product fast path falls back to the exact check: 1e3 is not flagged, 1001 is
    for value, flagged in ((1e3, False), (1001.0, True)):
        t = torch.zeros(4, 4)
        t[1, 2] = -value
        data = save({"base_model.model.x.lora_A.weight": t})
        tensors, _ = parse_header(data, len(data), "f")
        scan = ValueScan(tensors, 8 + int.from_bytes(data[:8], "little"), "f")
        scan.update(data)
        assert bool(scan.finish().absurd) is flagged


# ------------------------------------------------------------------ agreement
def test_target_modules_must_select_the_weighted_modules(bundle):
    _with_config(bundle, target_modules=["gate_proj", "not_in_base"])
    _refused(
        bundle, r"module 'model\.layers\.0\.self_attn\.q_proj' carries LoRA weights, but .*target_modules"
    )


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "v_proj"],
        ["self_attn.q_proj", "v_proj"],
        r".*\.(q_proj|v_proj)",
        "all-linear",
        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"],
    ],
)
def test_target_modules_forms_peft_accepts(targets, bundle):
    _with_config(bundle, target_modules=targets)
    assert check_bundle(bundle, vllm_check=False).manifest.adapter.modules == 4


def test_layers_to_transform_narrows_targets(bundle):
    _with_config(bundle, layers_to_transform=[0])
    _refused(bundle, r"module 'model\.layers\.1\.self_attn\.q_proj' carries LoRA weights")


def test_weights_for_a_module_the_base_lacks(bundle, tiny_base):
    from safetensors.torch import load_file, save

    w = load_file(bundle / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.zz_proj"): v for k, v in w.items()}
    _with_config(bundle, target_modules=["q_proj", "v_proj", "zz_proj"])
    adapter = {**json.loads((bundle / "manifest.json").read_text())["adapter"]}
    adapter["target_modules"] = ["q_proj", "v_proj", "zz_proj"]
    fx.reseal(
        bundle, {"adapter_model.safetensors": save(renamed, metadata={"format": "pt"})}, adapter=adapter
    )
    check_bundle(bundle, vllm_check=False)  # without a base, nothing to compare with
    _refused(
        bundle,
        r"targets module 'model\.layers\.1\.self_attn\.zz_proj', which base .* does not have",
        base_dir=tiny_base,
    )


def test_ranks_must_match_r_and_rank_pattern(bundle):
    _with_config(bundle, rank_pattern={"q_proj": 8})
    _refused(bundle, r"has rank 4 but .*adapter_config\.json says r=8 for this module")
    _with_config(bundle, r=8, rank_pattern={"q_proj": 4, r"layers\.\d+\.self_attn\.v_proj": 4})
    assert check_bundle(bundle, vllm_check=False).manifest.adapter.rank == 4


# ------------------------------------------------------------------ bounded parsing
def test_deeply_nested_safetensors_header(bundle):
    deep = b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    fx.reseal(bundle, {"adapter_model.safetensors": fx.safetensors_bytes(deep)})
    _refused(bundle, r"adapter_model\.safetensors: safetensors header: JSON nested 50001 levels deep")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("rank_pattern", {"q_proj(": 8}, r"rank_pattern key .*is not a valid regex"),
        (
            "rank_pattern",
            [1, 2],
            r"rank_pattern: must be an object mapping module patterns to numbers, got list",
        ),
        ("rank_pattern", {"(a+)+b": 8}, r"a quantifier on a group \(exponential matching cost"),
        ("rank_pattern", {r"(?=q)q_proj": 8}, r"regex feature 'assert' is not accepted"),
        ("rank_pattern", {r"(q)\1": 8}, r"regex feature 'groupref' is not accepted"),
        ("rank_pattern", {"a*b*c*d*": 8}, r"4 quantifiers, over 3"),
        ("rank_pattern", {"x" * 300: 8}, r"pattern is 300 characters, over 256"),
        ("rank_pattern", {"q_proj": "8"}, r"rank_pattern\['q_proj'\]: must be a positive integer"),
        ("alpha_pattern", {"(?i)q_proj": 8}, r"inline regex flags"),
        ("target_modules", "(a|aa)*$", r"target_modules: a quantifier on a group"),
        ("target_modules", {"q_proj": 1}, r"target_modules: must be a module name list or one regex string"),
        ("target_modules", ["q_proj", 3], r"target_modules: every entry must be a module name"),
        ("lora_alpha", float("nan"), r"NaN is not a JSON number"),
        ("r", 4.0, r"r must be a positive number"),
        ("use_rslora", "yes", r"use_rslora must be true or false"),
        ("layers_to_transform", "0", r"layers_to_transform must be an integer"),
        ("layers_pattern", "layers|h", r"layers_pattern must be a layer-list name"),
        ("auto_mapping", {"base_model_class": "x", "parent_library": "os"}, r"auto_mapping names a module"),
        ("megatron_config", {"a": 1}, r"megatron_config/megatron_core are set"),
    ],
)
def test_hostile_config_fields_are_one_line_errors(field, value, match, bundle):
    text = json.dumps({**_config(bundle), field: value})  # NaN is written as the bare word NaN
    fx.reseal(bundle, {"adapter_config.json": text.encode()})
    _refused(bundle, match)


def test_redos_pattern_is_refused_fast(bundle):
    _with_config(bundle, rank_pattern={"(a+)+b": 8, "(x|x)*y": 8})
    start = time.perf_counter()
    _refused(bundle, "quantifier on a group")
    assert time.perf_counter() - start < 2.0  # the raw regex costs seconds per module name


def test_duplicate_keys_are_refused(bundle):
    text = (bundle / "adapter_config.json").read_text().rstrip().rstrip("}") + ', "r": 64}'
    fx.reseal(bundle, {"adapter_config.json": text.encode()})
    _refused(bundle, r"adapter_config\.json: key 'r' appears twice in one object")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "appears twice"),
        (b'{"\\u001b[2Jx": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "printable characters"),
        (b'{"__metadata__": {"k": 1}}', "__metadata__ is not an object of strings"),
        (
            b'{"a": {"dtype": "F32", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1], "data_offsets": [0, 4]}}',
            "malformed shape",
        ),
        (b"[1, 2]", "not a JSON object"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_hostile_safetensors_headers(header, match, bundle):
    fx.reseal(bundle, {"adapter_model.safetensors": fx.safetensors_bytes(header, b"\0" * 4)})
    _refused(bundle, match)


def test_patterns_match_as_peft_matches():
    from peft.utils.other import get_pattern_key

    from adapterhub_lite.bundles.patterns import check_pattern, pattern_value

    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.11.mlp.down_proj",
        "lm_head",
        "transformer.h.3.attn.c_attn",
    ]
    keys = [
        "q_proj",
        "self_attn.q_proj",
        r"layers\.\d+\.mlp\.down_proj",
        "^model.layers.0.self_attn.q_proj",
        "h.3.attn.c_attn",
        "proj",
        "layers.1.mlp.down_proj",
        "(q|k)_proj",
        "[a-z]+_head",
        "lm_head$",
    ]
    for key in keys:
        check_pattern(key, "k")
        for name in names:
            peft_says = get_pattern_key([key], name) == key
            assert (pattern_value({key: 1}, name) == 1) == peft_says, (key, name)


# ------------------------------------------------------------------ nothing raw to a terminal
def test_terminal_injection_is_escaped(bundle, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    evil = "\x1b]0;pwned\x07\x1b[2J\u202eDEIFIREV"
    _with_config(bundle, base_model_name_or_path=None)  # the config names no base: only the manifest does
    fx.reseal(
        bundle,
        base={
            "name": evil,
            "fingerprint": json.loads((bundle / "manifest.json").read_text())["base"]["fingerprint"],
        },
    )
    r = CliRunner().invoke(app, ["verify", str(bundle), "--no-vllm"])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\u202e" not in r.output and "\\x1b]0;pwned" in r.output
    (bundle / "\x1b[31mVERIFIED").write_text("x")
    r = CliRunner().invoke(app, ["verify", str(bundle), "--no-vllm"])
    assert r.exit_code == 65 and "\x1b" not in r.output and "file not listed" in r.output


def test_archive_members_are_named_bundle_tar_member(bundle, tmp_path):
    from adapterhub_lite.bundles import write_archive

    fx.reseal(bundle, {"adapter_model.safetensors": _poisoned_weights(bundle, float("nan"))})
    tar = write_archive(bundle, [p.name for p in bundle.iterdir()], tmp_path / "geo.tar")
    _refused(tar, r"geo\.tar:adapter_model\.safetensors: tensor")
    # a directory extracted from an archive is named after the archive too
    msg = _refused(bundle, r"^geo\.tar:adapter_model\.safetensors", shown_as="geo.tar")
    assert str(bundle) not in msg


@pytest.mark.slow
def test_serving_resolver_refuses_non_finite_weights(tmp_path):
    """A NaN bundle that got into a registry anyway (publish's checks bypassed) is refused by the server's
    resolver, which verifies every bundle before vLLM sees it, and dropped from its cache."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.bundles import parse_manifest
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE_DIR, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "ad"
    )
    b = pack_bundle(
        tmp_path / "ad", tmp_path / "b", namespace="acme", name="nan", base_dir=EMBEDDED_BASE_DIR, **PACK
    )
    fx.reseal(b, {"adapter_model.safetensors": _poisoned_weights(b, float("nan"))})
    reg = open_registry(tmp_path / "reg")
    manifest = parse_manifest((b / "manifest.json").read_bytes())
    from adapterhub_lite.registry.publish import store_verified

    ref = store_verified(reg, b, manifest).ref  # what an attacker with write access could do
    cfg = ServingConfig(
        registry=str(tmp_path / "reg"), base_dir=str(EMBEDDED_BASE_DIR), cache_dir=str(tmp_path / "c")
    )
    res = AdapterResolver(cfg)
    # The pull verifies the download (a registry error) and the resolver verifies again: either way the
    # bundle is refused as invalid (422), never loaded, and nothing stays in the cache.
    with pytest.raises(AdapterHubError, match="non-finite") as exc:
        res.fetch(ref)
    assert exc.value.kind is ErrorKind.INVALID
    assert "\n" not in exc.value.message
    assert res.cache.get(manifest.digest) is None


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"base_model_name_or_path": "attacker/evil-model"},
            r"base_model_name_or_path is 'attacker/evil-model', but",
        ),
        ({"task_type": "SEQ_CLS"}, r"task_type is 'SEQ_CLS'; bundles hold causal-LM adapters"),
    ],
)
def test_config_cannot_point_peft_at_another_model(changes, match, bundle):
    _with_config(bundle, **changes)
    _refused(bundle, match)


@pytest.mark.parametrize("legacy", [None, "None", "/home/someone/runs/base", "base"])  # "base": its own base
def test_legacy_and_own_base_names_still_verify(legacy, bundle):
    _with_config(bundle, base_model_name_or_path=legacy)
    check_bundle(bundle, vllm_check=False)


def test_scan_file_checks_a_bare_adapter_directory(lora_dir, tmp_path):
    """What a server's admin-load route can call on a directory that is not a bundle."""
    from adapterhub_lite.bundles.values import scan_file

    assert scan_file(lora_dir / "adapter_model.safetensors").absurd == []
    (tmp_path / "w.safetensors").write_bytes(_poisoned_weights(lora_dir, float("inf")))
    with pytest.raises(BundleError, match=r"w\.safetensors: tensor .* holds non-finite values"):
        scan_file(tmp_path / "w.safetensors")


def test_admin_load_check_of_a_raw_directory(lora_dir, tiny_base, tmp_path):
    """The admin's /v1/load_lora_adapter runs the serving checks on a directory (gateway/admin_load.py)."""
    from adapterhub_lite.serving.gateway.admin_load import check_adapter_dir, lora_path_of

    def refused(path, match: str, base: Path = tiny_base, **kw) -> None:
        with pytest.raises(BundleError) as exc:
            check_adapter_dir(path, base, **kw)
        assert exc.value.kind is ErrorKind.INVALID
        assert re.search(match, _one_line(exc)), exc.value.message

    assert check_adapter_dir(lora_dir, tiny_base, max_lora_rank=16) == []
    wide = fx.make_base(tmp_path / "bases", "wide", hidden=96)
    refused(lora_dir, r"in_features|out_features|shape", base=wide)  # made for another base
    refused(lora_dir, r"rank 4, above the server's max_lora_rank 2", max_lora_rank=2)
    refused(Path("someone/lora"), r"not an absolute path to a directory")
    refused(tmp_path / "missing", r"not an absolute path to a directory")
    for name, change, match in [
        (
            "nan",
            lambda d: (d / "adapter_model.safetensors").write_bytes(
                _poisoned_weights(lora_dir, float("nan"))
            ),
            r"nan/adapter_model\.safetensors: tensor .* holds non-finite values",
        ),
        (
            "pickle",
            lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04N."),
            r"adapter_model\.bin is a pickle",
        ),
        ("noweights", lambda d: (d / "adapter_model.safetensors").unlink(), r"no adapter_model\.safetensors"),
        (
            "badconfig",
            lambda d: (d / "adapter_config.json").write_bytes(b"[" * 5000),
            r"adapter_config\.json",
        ),
    ]:
        shutil.copytree(lora_dir, tmp_path / name)
        change(tmp_path / name)
        refused(tmp_path / name, match)
    assert lora_path_of(json.dumps({"lora_name": "x", "lora_path": "/a"}).encode()) == "/a"
    for body in (b"[]", b'{"lora_path": 3}', b"{" * 100, b'{"lora_path": "/a", "lora_path": "/b"}'):
        with pytest.raises(BundleError, match="request body"):
            lora_path_of(body)
