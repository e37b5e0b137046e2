"""Configuration: environment settings, the trainer config schema, its layers and the locked block.

Nothing in this package imports torch, transformers or celery: the CLI path stays fast.
"""
