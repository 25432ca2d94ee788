"""The op's hyperparameter table layout, as the C++ defines it (csrc/noam_ext/adamw_math.h,
schedule_math.h) and noam_ext._C.table_layout() exports it: which column holds what, the
schedule kinds and the decay shapes, by name; and the state keys and dtypes of the master
forms (storage.h). Python builds table rows from this only, so
the layout is written once.

Read on first use: the schedules' pure functions work without the compiled extension (a
source checkout that was never built); only building a table row needs it. The optimizer
reads it when it is imported (noam_ext/_hyper.py), so a compiled step finds it loaded."""

from __future__ import annotations

_LAYOUT: dict | None = None


def table_layout() -> dict:
    global _LAYOUT
    if _LAYOUT is None:
        from ._extension import _C

        _LAYOUT = _C.table_layout()
    return _LAYOUT
