"""mmfast's version, in a module that imports nothing: ``mmfast --version`` reads it without
torch, and pyproject.toml takes the distribution's version from it."""

__version__ = "0.1.0"
