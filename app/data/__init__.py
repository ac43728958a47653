"""Data: the types of a federation, partitioners, the dataset loaders, the per-device split, and their checks."""
