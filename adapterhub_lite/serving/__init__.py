"""Serving: the vLLM plugin (resolver), tenancy middleware, eviction, metrics and the launcher.

Importing this package does not import vLLM; `resolver` and `plugin` do, and run inside vLLM.
"""

from adapterhub_lite.serving.config import ServingConfig
from adapterhub_lite.serving.launcher import ServeOptions, VLLMServer
from adapterhub_lite.serving.tenancy import Tenant, TenantStore

__all__ = ["ServeOptions", "ServingConfig", "Tenant", "TenantStore", "VLLMServer"]
