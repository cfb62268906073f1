"""The one seam to Ray Serve's internals (as `vllm_compat` is to vLLM's): what its options cannot say.

Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on `[::]:0` — every interface —
whatever address the node was given (ray/serve/_private/replica.py, `_on_initialized`). A cluster whose
Ray listens on loopback only keeps that server there too, by rewriting the address it binds.
"""

from __future__ import annotations

from typing import Any

ALL_INTERFACES = "[::]:"
LOOPBACK = "127.0.0.1:"


def keep_replica_grpc_on_loopback() -> bool:
    """Make this process's Serve replicas bind their gRPC server to loopback; True if it applied (or
    already had). Call it in a replica's constructor: Serve starts the server right after it."""
    try:
        from ray.serve._private import replica as replica_module
    except ImportError:  # pragma: no cover - another Ray: nothing to rewrite
        return False
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None:
        return False
    if getattr(original, "adapterhub_loopback", False):
        return True

    def on_loopback(server: Any, address: str) -> int:
        if isinstance(address, str) and address.startswith(ALL_INTERFACES):
            address = LOOPBACK + address[len(ALL_INTERFACES) :]
        return original(server, address)

    on_loopback.adapterhub_loopback = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = on_loopback
    return True
