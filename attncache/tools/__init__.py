"""Tools around the two stages: verify.py (check a cache), bench.py (measure), demo.py (`make demo`)."""
