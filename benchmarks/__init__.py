"""Benchmarks: scripts that print speed and memory figures as ratios measured side by side in one run. Run them from
the repository root as modules, e.g. `python -m benchmarks.aggregators --quick` (the venv has the project installed)."""
