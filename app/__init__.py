"""Ditto on Flower: the ServerApp, the ClientApp and everything they share."""
