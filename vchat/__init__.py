"""vchat: the framework-free core of the VisualChat reimplementation (numpy and PIL only)."""

__version__ = "0.1.0"
