"""Adapter bundles: the contract between training, the registry and serving.

A bundle is a PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`) plus an
adapter card (`README.md`), a schema-versioned `manifest.json` that pins the base model by fingerprint and
hashes every file, and optional ed25519 `signatures.json`. It exists as a directory (itself loadable by
PEFT and vLLM) or as one reproducible tar archive.
"""

from adapterhub_lite.bundles.archive import extract_archive, scan_archive, write_archive
from adapterhub_lite.bundles.manifest import MANIFEST_FILE, SCHEMA_VERSION, Manifest, parse_manifest
from adapterhub_lite.bundles.naming import DEFAULT_VERSION, Ref, parse_ref, semver_key
from adapterhub_lite.bundles.pack import pack_bundle, sign_bundle
from adapterhub_lite.bundles.signing import TrustedKey, generate_key, list_keys, trusted_key
from adapterhub_lite.bundles.verify import Verification, check_bundle, verify_bundle

__all__ = [
    "DEFAULT_VERSION",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "Manifest",
    "Ref",
    "TrustedKey",
    "Verification",
    "check_bundle",
    "extract_archive",
    "generate_key",
    "list_keys",
    "pack_bundle",
    "parse_manifest",
    "parse_ref",
    "scan_archive",
    "semver_key",
    "sign_bundle",
    "trusted_key",
    "verify_bundle",
    "write_archive",
]
