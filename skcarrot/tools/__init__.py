"""Tooling around the method: the benchmark, white-box baselines, presets, the demo, the
embedded model's recipe and the command line."""
