"""lanchat: a zero-configuration chat for a local network."""

__version__ = "0.1.0"
