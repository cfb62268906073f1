"""Plain-torch kernels that the vLLM seam (`adapterhub_lite/vllm_compat/`) installs; they import no vLLM."""
