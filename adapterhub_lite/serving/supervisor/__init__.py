"""The CLI's side of serving: start vLLM with the plugin and the gateway, supervise it, stop it in order."""

from adapterhub_lite.serving.supervisor.launcher import ServeOptions, VLLMServer

__all__ = ["ServeOptions", "VLLMServer"]
