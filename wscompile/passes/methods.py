"""The registry of element-selection methods: ``--method NAME`` -> its ``MethodSpec``.

A new method is one file defining ``NAME``, ``choose`` and ``SPEC`` (see ``choice.py``) and one
entry below. ``choices.METHODS`` (the CLI's list, importable without torch) is tested to agree.
"""

from __future__ import annotations

from wscompile.errors import SelectionError
from wscompile.passes import activation, consecutive, magnitude, random_select, uniform
from wscompile.passes.choice import MethodSpec

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (uniform.SPEC, consecutive.SPEC, random_select.SPEC, magnitude.SPEC, activation.SPEC)
}


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; raises SelectionError naming the choices."""
    if name not in METHODS:
        raise SelectionError(f"unknown selection method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
