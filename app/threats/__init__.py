"""Threat models: the attacks of malicious devices, and nodes that lie (for the chaos tests)."""
