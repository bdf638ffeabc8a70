"""Tools around the two stages: verify.py (check a cache), bench/ (measure), demo.py (`make demo`), copy.py,
costs.py (`attncache plan`), plot.py, viz.py."""
