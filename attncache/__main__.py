"""`python -m attncache ...` is the `attncache` command (torchrun and SLURM scripts launch modules)."""

from attncache_cli.main import main

main()
