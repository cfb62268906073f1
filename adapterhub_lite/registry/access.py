"""Who may read what: an adapter is readable by its own namespace, by namespaces it is shared with,
and by everyone once public. Sharing covers every version of a package."""

from __future__ import annotations

from adapterhub_lite.bundles.naming import check_name
from adapterhub_lite.errors import RegistryError
from adapterhub_lite.registry.parts import RegistryParts
from adapterhub_lite.registry.records import Published, invalid, newest, ref_of


def _unknown(reg: RegistryParts, package: str) -> RegistryError:
    return RegistryError(f"no adapter {package} in the registry at {reg.shown}")


def share(reg: RegistryParts, ref: str, with_namespace: str, revoke: bool) -> None:
    """Let another namespace read an adapter (all its versions), or revoke that."""
    check_name(with_namespace, "namespace", invalid)  # type: ignore[arg-type]
    r = ref_of(ref)
    if not reg.index.set_share(r.namespace, r.name, with_namespace, not revoke):
        raise _unknown(reg, r.package)


def set_public(reg: RegistryParts, ref: str, public: bool) -> None:
    """Make an adapter (all its versions) readable by every namespace, or private again."""
    r = ref_of(ref)
    if not reg.index.set_public(r.namespace, r.name, public):
        raise _unknown(reg, r.package)


def shared_with(reg: RegistryParts, ref: str) -> list[str]:
    r = ref_of(ref)
    return reg.index.shared_with(r.namespace, r.name)


def newest_of_each(rows: list[Published]) -> list[Published]:
    """The newest version of each package among `rows`, in package order."""
    by_package: dict[tuple[str, str], list[Published]] = {}
    for p in rows:
        by_package.setdefault((p.namespace, p.name), []).append(p)
    return [n for _, ps in sorted(by_package.items()) if (n := newest(ps))]


def readable(reg: RegistryParts, namespace: str, base: str | None) -> list[Published]:
    """The newest non-yanked version of each adapter `namespace` may use: its own, shared with it,
    or public; with `base`, only adapters for that base fingerprint."""
    return newest_of_each(reg.index.readable(namespace, base))


def can_read(reg: RegistryParts, namespace: str, ref: str) -> bool:
    """Whether `namespace` may use `ref` (unknown or malformed refs: False)."""
    try:
        r = ref_of(ref)
    except RegistryError:
        return False
    return reg.index.access(namespace, r.namespace, r.name, r.version)
