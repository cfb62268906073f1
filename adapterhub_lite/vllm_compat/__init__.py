"""The vLLM seam: every use of vLLM internals lives in this package (one module per owner).

Minimal placeholder from branch `bundles` until the serving engineer's package lands; it imports nothing
from vLLM, so `adapterhub_lite.vllm_compat.peft` stays importable and fast where vLLM is absent.
"""
