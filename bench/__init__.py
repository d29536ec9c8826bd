"""Throughput and latency benchmark of the docproc pipeline (see bench/README.md)."""
