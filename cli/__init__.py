"""The `adapterhub` command line (typer)."""
