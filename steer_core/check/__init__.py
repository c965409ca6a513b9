"""Measuring an adapter against hook steering: verify (held-out text) and the servability map (before an export)."""
