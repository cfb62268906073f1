"""Several vLLM replicas, each with the adapterhub plugin, under Ray Serve, routed by adapter affinity.

- `affinity`: which immutable adapter reference a request will use (the routing key).
- `replica`: one Ray Serve replica = one vLLM server with the plugin and tenancy, proxied.
- `ingress`: the HTTP front that routes each request to a replica already holding its adapter.
- `launch`: starting and stopping the whole application on a local or existing Ray cluster.

Tenancy stays inside every replica (the ingress authorizes nothing), so a replica reached directly
still checks keys: the cluster fails closed on every path.
"""
