"""The aggregation rules: pure functions over a round's stacked updates, their registry, and the compiled kernels
that make the exact selections cost about one Gram product."""
