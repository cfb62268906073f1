"""Which keys a registry trusts, and for which namespaces.

A registry's config lists trusted keys as a 64-hex public key (trusted for every namespace: how
registries have always stored them) or `{"public_key": hex, "namespaces": [...]}` (trusted only for
those namespaces; the form `bundles.signing.TrustedKey` stores). With any key trusted, publish and pull
require a signature by a key trusted for the bundle's namespace: a key trusted for `acme` cannot put
a version under `globex`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from adapterhub_lite.bundles.signing import check_signatures, key_id, load_public_key
from adapterhub_lite.errors import BundleError, ErrorKind, RegistryError


@dataclass(frozen=True)
class Trust:
    """The public keys a registry trusts; `scopes[key id]` is a key's namespaces (None: all)."""

    keys: list[Any] = field(default_factory=list)
    scopes: dict[str, frozenset[str] | None] = field(default_factory=dict)

    def require(self, signatures: bytes | None, digest: str, namespace: str, what: str) -> list[str]:
        """Check `signatures` (signatures.json bytes) on `digest`: with trusted keys, one signer must
        be trusted for `namespace`. Returns the signers' key ids."""
        try:
            signers = check_signatures(signatures, digest, self.keys)
        except BundleError as exc:
            raise RegistryError(f"{what}: {exc.message}", hint=exc.hint, kind=exc.kind) from None
        if not self.keys or any(
            self.scopes.get(s, frozenset()) is None or namespace in (self.scopes.get(s) or ())
            for s in signers
        ):
            return signers
        trusted = sorted(s for s in signers if s in self.scopes)
        scopes = "; ".join(f"{s} for {', '.join(sorted(self.scopes[s] or ()))}" for s in trusted)
        raise RegistryError(
            f"{what}: signed by {scopes}, not trusted for namespace {namespace!r}",
            hint=f"sign it with a key trusted for {namespace!r}, or trust the key for it "
            f"(`adapterhub registry trust KEY --namespace {namespace}`)",
            kind=ErrorKind.FORBIDDEN,
        )


def load_trust(entries: Iterable[Any] | None) -> Trust:
    """A Trust from config entries (hex, {"public_key", "namespaces"}) or public keys of any form
    `load_public_key` reads (unscoped)."""
    keys, scopes = [], {}
    for entry in entries or []:
        namespaces: frozenset[str] | None = None
        if isinstance(entry, dict):
            if not isinstance(entry.get("public_key"), str) or not isinstance(
                entry.get("namespaces"), list | type(None)
            ):
                raise RegistryError(
                    "registry config: a trusted key entry is malformed",
                    hint='use "<64 hex>" or {"public_key": "<64 hex>", "namespaces": ["acme"]}',
                    kind=ErrorKind.INTERNAL,
                )
            if entry["namespaces"] is not None:
                namespaces = frozenset(str(n) for n in entry["namespaces"])
            entry = entry["public_key"]
        key = load_public_key(entry)
        kid = key_id(key)
        if kid not in scopes:
            keys.append(key)
        previous = scopes.get(kid, frozenset())
        scopes[kid] = None if namespaces is None or previous is None else previous | namespaces
    return Trust(keys, scopes)
