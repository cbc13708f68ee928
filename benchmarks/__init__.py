"""Benchmarks of fused_losses against its reference and its peers: see benchmarks/README.md."""
