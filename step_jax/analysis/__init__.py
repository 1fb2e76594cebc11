"""Layer 5, analysis: wall-clock benchmarks, per-layer profiles and visualisations."""
