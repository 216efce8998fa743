"""locedit: does localization inform editing? The study runner and command line (``locedit``).

The library lives in the top-level packages ``tracer`` (load + localize), ``editors`` (ROME, MEMIT, FT),
``problems`` (datasets, editing problems, metrics) and ``stats`` (collapse, regressions, tables, figures);
this package wires them into resumable batch studies.
"""

__version__ = "0.1.0"
