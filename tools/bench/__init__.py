"""Speed and quality benchmarks (docs/BENCHMARKS.md)."""
