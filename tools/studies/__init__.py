"""Type-design studies (docs/BENCHMARKS.md round 8): dithering, outliers, per-design KLD, grid reach."""
