"""The DIME paper's evaluation, and more, as experiments in network namespaces.

Each experiment is a module with ``NAME``, ``TITLE``, ``run(ctx) -> Path`` (writes
``<out>/<NAME>.json`` with :func:`common.write_result`, and its plots as
``<out>/<NAME>*.png``) and ``report(doc, out, md_dir) -> str`` (the Markdown section
for RESULTS.md, which lives in ``md_dir``: link plots relative to it).
``python -m testbed.experiments`` runs them; see ``__main__.py``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# In the order they run and appear in RESULTS.md.
NAMES = (
    "goodput",
    "scalability",
    "signaling",
    "overhead",
    "crossfamily",
    "footprint",
    "firstpacket",
)


def load(name: str) -> ModuleType:
    return importlib.import_module(f"testbed.experiments.{name}")
