"""Hostile bundles: each case an attacker could build is refused with one line naming the file and field.

Every bundle here is made by packing a real PEFT adapter and then changing one thing the way an attacker
would (the manifest, card and hashes rewritten consistently where the attack needs it), so each test
reaches the check it is about rather than failing earlier on a hash.
"""

from __future__ import annotations

import pytest

from adapterhub_lite.bundles import TrustedKey, check_bundle, pack_bundle, sign_bundle, trusted_key
from adapterhub_lite.bundles.signing import generate_key, load_public_key
from adapterhub_lite.errors import BundleError

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
