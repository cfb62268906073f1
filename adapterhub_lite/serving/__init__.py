"""Serving: one package per process a module runs in.

- `supervisor/`: the CLI's side: start vLLM with the plugin and the gateway, time its start-up, stop it
  in order (`VLLMServer`, `ServeOptions`).
- `plugin/`: inside every vLLM process, through the `vllm.general_plugins` entry point: the resolver
  that fetches and verifies bundles into the disk cache, and the watch on the parent process.
- `gateway/`: inside vLLM's API server, as ASGI middleware: keys, tenant views, rate limits, the hot
  set, rollouts, the usage ledger, metrics and the admin routes.

Beside them: `config` (the settings all three read from the environment) and the rollout operations an
operator's command runs against a live server (`rollout_ops`, `rollout_eval`). The tenant store (keys,
aliases, rollouts, usage) is `adapterhub_lite.tenants`. Importing this package imports nothing else.
"""
