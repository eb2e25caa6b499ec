"""numpy for the command line, imported on first use.

``cpadgn --help`` and ``cpadgn COMMAND --help`` only build click's option tables;
importing numpy (about half of their start-up CPU) waits until a command runs.
The command modules write ``from cli.lazy import np`` and use ``np.`` as usual.
"""
from __future__ import annotations

import importlib


class LazyModule:
    """Stands for the module ``name``; the first attribute access imports it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self):
        return f"<lazy module {self._name!r}>"


np = LazyModule("numpy")
