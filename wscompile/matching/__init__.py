"""Matching: layer selection, component mapping and coupled-dimension groups."""

from wscompile.matching.align import Alignment, align

__all__ = ["Alignment", "align"]
