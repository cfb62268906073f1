"""The gateway: the tenancy middleware and everything it runs inside vLLM's API server (one process).

`middleware.TenancyMiddleware` is what vLLM's `--middleware` loads; the rest are its parts: keys and
views, request validation, rate limits, the hot set, rollouts, the usage ledger, metrics, admin routes.
"""
