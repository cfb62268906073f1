"""adapterhub-lite: train LoRA/QLoRA adapters, pack them as bundles, serve them per tenant in vLLM."""

__version__ = "0.1.0"
