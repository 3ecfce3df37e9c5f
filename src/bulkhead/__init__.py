"""Bulkhead: label-based micro-segmentation enforced by each host's own firewall."""

__version__ = "0.1.0"
