"""Maintenance: find orphaned, missing and corrupt blobs and leftover temp files, and repair.

`repair` removes orphans and temp files older than a grace period (younger ones may belong to a
publish in progress); a missing blob is restored by publishing the bundle again.
"""

from __future__ import annotations

from adapterhub_lite.registry.parts import RegistryParts
from adapterhub_lite.registry.records import CheckReport

DEFAULT_GRACE_S = 3600.0


def check(reg: RegistryParts, repair: bool, grace_s: float, deep: bool) -> CheckReport:
    # Keys trusted for every namespace still work (older configs) but are named: any of them may sign
    # under any team's namespace.
    report = CheckReport(index_ok=reg.index.integrity_ok(), unscoped_keys=reg.trusted.unscoped())
    refs = reg.index.blob_refs()
    blobs = reg.blobs.blobs()
    stored = {b.sha256: b for b in blobs if b.sha256}
    for b in blobs:
        if b.sha256 is None or b.sha256 not in refs:
            report.orphaned_blobs.append(b.path)
            if repair and b.age_s >= grace_s:
                reg.blobs.remove(b.path)
                report.removed.append(b.path)
            elif repair:
                report.kept_recent.append(b.path)
    for t in reg.blobs.temp_files():
        report.stale_temp_files.append(t.path)
        if repair and t.age_s >= grace_s:
            reg.blobs.remove(t.path)
            report.removed.append(t.path)
        elif repair:
            report.kept_recent.append(t.path)
    for sha, where in sorted(refs.items()):
        if sha not in stored:
            report.missing_blobs.extend({"blob": f"sha256:{sha}", "file": w} for w in sorted(where))
        elif deep and reg.blobs.hash_blob(sha) != sha:
            report.corrupt_blobs.append(stored[sha].path)
    return report
