"""The qcompile version, recorded in checkpoints and exported files."""

__version__ = "0.1.0"
