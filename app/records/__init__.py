"""What a run records: the names of the scored models, results files, metrics, personal state and checkpoints, the
progress line."""
