"""The vLLM plugin, loaded in every vLLM process: the resolver (registry -> verified bundle in the disk
cache -> vLLM's LoRA loader) and the watch on the parent process. `entry.register` is the entry point."""
