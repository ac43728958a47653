"""What sweeps show: collection, statistics over seeds, the claim per setting, figures, and the paper's analysis of
lambda."""
