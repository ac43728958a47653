"""Server side: a Flower Strategy (robust.py) that identifies devices, checks their replies and aggregates the round
with a registry rule (rules/). Nothing here imports app/; this package imports nothing eagerly, so a client that
needs one helper (fair.py) does not load Flower's server."""
