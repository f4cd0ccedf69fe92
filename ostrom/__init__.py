"""Ostrom: a peer-to-peer node for commons-based peer production."""

__version__ = "0.1.0"
