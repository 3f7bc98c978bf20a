"""A trivial Flower app: bare Flower's round latency, the floor of benchmarks/e2e.py."""
