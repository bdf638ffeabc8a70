"""The `attncache` command line (installed as the `attncache_cli` package): argument parsing only."""
