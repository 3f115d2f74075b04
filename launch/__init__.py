"""Launch scripts (run as `python launch/<script>.py`); a package so tests can import their functions."""
