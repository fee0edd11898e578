"""Tools for developing and testing pdbox without real workers."""
