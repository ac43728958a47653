"""The configuration: composed from conf/ (compose), checked (validate), compared (keys)."""
