"""Pull benchmarks: the mirror against Distribution's proxy and nginx (``python -m benchmarks``)."""
