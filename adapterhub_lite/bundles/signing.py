"""Ed25519 signatures over a bundle's digest, and the user's key store.

A signature signs `b"adapterhub-bundle-v1\\0" + digest`, so signing never changes the bundle's identity and
a signature cannot be replayed for another kind of message. Signatures live in `signatures.json` beside
the manifest. A verifier trusts keys as `TrustedKey`s: a public key plus the namespaces it may sign for
(None: any namespace, how keys trusted before scoping existed are read). Private keys are kept under
the user's config directory (`$ADAPTERHUB_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/adapterhub`, else `~/.config/adapterhub`), in `keys/`, mode 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from adapterhub_lite.bundles.manifest import load_json_bounded
from adapterhub_lite.bundles.naming import check_name
from adapterhub_lite.errors import BundleError
from adapterhub_lite.settings import config_dir as settings_config_dir

SIGNATURES_FILE = "signatures.json"
_CONTEXT = b"adapterhub-bundle-v1\0"
MAX_SIGNATURES = 16

SigningKeyLike = Ed25519PrivateKey | str | Path
PublicKeyLike = Ed25519PublicKey | str | Path


def config_dir() -> Path:
    """The user's adapterhub config directory (`adapterhub_lite.settings.config_dir`)."""
    return settings_config_dir()


def keys_dir() -> Path:
    return config_dir() / "keys"


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: `ed25519:` + 16 hex of its sha256."""
    return "ed25519:" + hashlib.sha256(bytes.fromhex(public_hex(key))).hexdigest()[:16]


@dataclass(frozen=True)
class KeyInfo:
    name: str
    key_id: str
    public_key: str
    path: Path


def generate_key(name: str, directory: Path | None = None) -> KeyInfo:
    """Create a new ed25519 key pair `<name>.key` (0600) + `<name>.pub`; refuse to overwrite one."""
    check_name(name, "key name")
    directory = directory or keys_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if priv_path.exists() or pub_path.exists():
        raise BundleError(f"key {name!r} already exists in {directory}", hint="choose another name")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL + mode 0600 at creation: the private key is never readable by others, not even briefly.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key()
    pub_path.write_text(public_hex(pub) + "\n")
    return KeyInfo(name, key_id(pub), public_hex(pub), priv_path)


def list_keys(directory: Path | None = None) -> list[KeyInfo]:
    """The key pairs in the key store."""
    directory = directory or keys_dir()
    out = []
    for pub_path in sorted(directory.glob("*.pub")) if directory.is_dir() else []:
        pub = load_public_key(pub_path)
        out.append(KeyInfo(pub_path.stem, key_id(pub), public_hex(pub), pub_path.with_suffix(".key")))
    return out


def load_signing_key(key: SigningKeyLike) -> Ed25519PrivateKey:
    """A private key given as an object, a key-store name, or a PEM file path."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    path = Path(key).expanduser()
    if not path.is_file():
        path = keys_dir() / f"{key}.key"
    if not path.is_file():
        raise BundleError(
            f"signing key {str(key)!r} not found (neither a file nor a key in {keys_dir()})",
            hint="create one with `adapterhub keys generate NAME`",
        )
    if path.stat().st_mode & 0o077:
        raise BundleError(f"{path}: private key is readable by other users", hint=f"run `chmod 600 {path}`")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise BundleError(
            f"{path}: not an ed25519 key", hint="create one with `adapterhub keys generate NAME`"
        )
    return loaded


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """A public key given as an object, 64 hex characters, a `.pub` (hex) or PEM file, or a key-store name."""
    if isinstance(key, Ed25519PublicKey):
        return key
    text = str(key).strip()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower()):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    path = Path(text).expanduser()
    if not path.is_file():
        path = keys_dir() / f"{text}.pub"
    if not path.is_file():
        raise BundleError(
            f"public key {text!r} not found (not hex, a file, or a key in {keys_dir()})",
            hint="pass 64 hex characters, a .pub file, or a key name from `adapterhub keys list`",
        )
    content = path.read_bytes().strip()
    try:
        if content.startswith(b"-----BEGIN"):
            loaded = serialization.load_pem_public_key(content)
            if not isinstance(loaded, Ed25519PublicKey):
                raise ValueError("not an ed25519 key")
            return loaded
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(content.decode()))
    except (ValueError, UnicodeDecodeError):
        raise BundleError(
            f"{path}: not an ed25519 public key (64 hex characters or a PEM public key)",
            hint="use the .pub file that `adapterhub keys generate` wrote",
        ) from None


@dataclass(frozen=True)
class TrustedKey:
    """A public key trusted to sign bundles of `namespaces` (None: of any namespace, the legacy form)."""

    public_key: Ed25519PublicKey
    namespaces: frozenset[str] | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def allows(self, namespace: str | None) -> bool:
        """Whether this key may vouch for a bundle of `namespace` (None: namespace unknown)."""
        if self.namespaces is None:
            return True
        return namespace is not None and namespace in self.namespaces

    def to_json(self) -> dict[str, object]:
        """The form a registry config stores: `{"public_key": hex, "namespaces": [...] or null}`."""
        ns = sorted(self.namespaces) if self.namespaces is not None else None
        return {"public_key": public_hex(self.public_key), "namespaces": ns}

    def describe(self) -> str:
        if self.namespaces is None:
            return f"{self.key_id} (any namespace)"
        return f"{self.key_id} (namespaces {', '.join(sorted(self.namespaces)) or 'none'})"


TrustedKeyLike = TrustedKey | PublicKeyLike | dict


def trusted_key(key: TrustedKeyLike, namespaces: Iterable[str] | None = None) -> TrustedKey:
    """A TrustedKey from a TrustedKey, a public key (hex, file, key name; scoped by `namespaces`), or
    the stored form `{"public_key": hex, "namespaces": [...] | null}`."""
    if isinstance(key, TrustedKey):
        return key
    if isinstance(key, dict):
        if set(key) - {"public_key", "namespaces"} or not isinstance(key.get("public_key"), str):
            raise BundleError(
                f"trusted key entry {sorted(key)!r} is malformed",
                hint='use {"public_key": "<64 hex>", "namespaces": ["acme"]} (namespaces null: any)',
            )
        namespaces = key.get("namespaces")
        if namespaces is not None and not isinstance(namespaces, list):
            raise BundleError(
                "trusted key entry: namespaces must be a list of names or null",
                hint='use {"public_key": "<64 hex>", "namespaces": ["acme"]}',
            )
        key = key["public_key"]
    if namespaces is not None:
        namespaces = frozenset(check_name(n, "namespace") for n in namespaces)
    return TrustedKey(load_public_key(key), namespaces)


def load_public_keys(keys: Iterable[TrustedKeyLike] | None) -> list[TrustedKey]:
    """Trusted keys from any mix of TrustedKeys, public keys (unscoped) and stored entries."""
    return [trusted_key(k) for k in keys or []]


load_trusted_keys = load_public_keys


def sign_digest(key: Ed25519PrivateKey, digest: str) -> dict[str, str]:
    pub = key.public_key()
    return {
        "key_id": key_id(pub),
        "public_key": public_hex(pub),
        "signature": key.sign(_CONTEXT + digest.encode()).hex(),
    }


def signatures_bytes(signatures: list[dict[str, str]]) -> bytes:
    """The exact bytes of `signatures.json`."""
    body = {"schema_version": 1, "signatures": sorted(signatures, key=lambda s: s["key_id"])}
    return (json.dumps(body, sort_keys=True, indent=2) + "\n").encode()


def check_signatures(
    data: bytes | None,
    digest: str,
    trusted: Iterable[TrustedKeyLike] | None,
    label: str = SIGNATURES_FILE,
    *,
    namespace: str | None = None,
) -> list[str]:
    """Verify every signature in `signatures.json`; return the signers' key ids.

    Any bad signature is refused, trusted or not. With `trusted` keys, at least one of them must have
    signed the bundle *and* be trusted for its `namespace` (a scoped key never vouches for a bundle
    whose namespace is not given).
    """
    trusted = load_trusted_keys(trusted)
    signers: list[str] = []
    if data is not None:
        body = load_json_bounded(data, label, max_bytes=64 * 1024, max_depth=4)
        sigs = body.get("signatures") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or set(body) != {"schema_version", "signatures"}
            or body["schema_version"] != 1
            or not isinstance(sigs, list)
            or not 1 <= len(sigs) <= MAX_SIGNATURES
        ):
            raise BundleError(f"{label}: malformed signatures file", hint="sign the bundle again")
        for i, s in enumerate(sigs):
            if (
                not isinstance(s, dict)
                or set(s) != {"key_id", "public_key", "signature"}
                or not all(isinstance(v, str) for v in s.values())
            ):
                raise BundleError(f"{label}: signature #{i} is malformed", hint="sign the bundle again")
            try:
                pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(s["public_key"]))
                if key_id(pub) != s["key_id"]:
                    raise InvalidSignature
                pub.verify(bytes.fromhex(s["signature"]), _CONTEXT + digest.encode())
            except (ValueError, InvalidSignature):
                raise BundleError(
                    f"{label}: signature by {s['key_id']} does not match this bundle (tampered, or signed "
                    "for other content)",
                    hint="get the bundle again from its publisher, or sign it again",
                ) from None
            signers.append(s["key_id"])
        if signatures_bytes(sigs) != data:
            raise BundleError(
                f"{label}: not in canonical form (edited by hand, or corrupt)", hint="sign the bundle again"
            )
    if trusted:
        by_id: dict[str, list[TrustedKey]] = {}
        for k in trusted:
            by_id.setdefault(k.key_id, []).append(k)
        if not signers:
            raise BundleError(
                "the bundle is unsigned, but signatures from trusted keys are required",
                hint="sign it with `adapterhub pack --sign KEY` using a trusted key",
            )
        known = [k for s in signers for k in by_id.get(s, [])]
        if not known:
            raise BundleError(
                f"the bundle is signed by {', '.join(signers)}, none of which is trusted here",
                hint="add the publisher's public key to the trusted keys, or sign it with a trusted key",
            )
        if not any(k.allows(namespace) for k in known):
            where = f"namespace {namespace!r}" if namespace is not None else "a bundle of unknown namespace"
            raise BundleError(
                f"{label}: the bundle is signed by {', '.join(sorted({k.describe() for k in known}))}, "
                f"which is not trusted for {where}",
                hint=f"sign it with a key trusted for {namespace!r}, or trust the key for it "
                f"(`adapterhub registry trust KEY --namespace {namespace}`)",
            )
    return signers
