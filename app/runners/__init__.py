"""The commands and what runs the two Flower apps: the Hydra entry, flwr run, a loopback deployment, the tuned
simulation engine, and how a command ends on a refusal."""
