"""Attention ops with several implementations, each one folder: a naive reference beside its fast versions.

Backends run ops; an op never imports a variant or a backend's registry, and a backend never names a variant.
"""
