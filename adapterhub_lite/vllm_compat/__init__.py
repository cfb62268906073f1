"""The one seam to vLLM's internals (see the serving engineer's version check, which replaces this stub)."""
