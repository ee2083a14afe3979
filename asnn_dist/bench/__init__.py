"""Benchmarks users can run (`asnn-dist bench ...`)."""
