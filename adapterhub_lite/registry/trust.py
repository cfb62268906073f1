"""Which keys a registry trusts, and for which namespaces.

A registry's config lists trusted keys as `{"public_key": hex, "namespaces": [...]}` (trusted only for
those namespaces; the form `bundles.signing.TrustedKey` stores) or a bare 64-hex public key (trusted for
every namespace). With any key trusted, publish and pull require a signature by a key trusted for the
bundle's namespace: a key trusted for `acme` cannot put a version under `globex`.

Scoped trust is the default: `adapterhub registry trust KEY` needs `--namespace NS` or an explicit
`--all-namespaces` (`trust_scope`), because a registry that trusts two teams' keys for every namespace
lets either team publish under the other's name. Config files written before keep working; `registry
check` lists their all-namespace keys (`Trust.unscoped`).
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

    def unscoped(self) -> list[str]:
        """Ids of the keys trusted for every namespace (flagged by `registry check`)."""
        return sorted(kid for kid, scope in self.scopes.items() if scope is None)

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


def trust_scope(namespaces: Iterable[str] | None, all_namespaces: bool) -> list[str] | None:
    """The namespaces a `trust` command asks for: a list, or None for every namespace, which must be
    asked for explicitly. Neither, or both, is an INVALID error that says what to do."""
    names = list(namespaces or [])
    if names and all_namespaces:
        raise RegistryError(
            "--namespace and --all-namespaces contradict each other",
            hint="name the namespaces the key may sign for, or pass --all-namespaces alone",
            kind=ErrorKind.INVALID,
        )
    if not names and not all_namespaces:
        raise RegistryError(
            "say which namespaces this key may sign for",
            hint="add --namespace NS (repeatable); --all-namespaces trusts it for every namespace, "
            "letting its holder publish under any team's name",
            kind=ErrorKind.INVALID,
        )
    return names or None
