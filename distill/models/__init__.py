"""Model families (one module each, a `Family` of family.py) and their registry (registry.py).

This package's own import loads nothing, so that a section config (config.py) is read without
torch; import the registry's functions from distill.models.registry.
"""
