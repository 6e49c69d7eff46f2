"""Regression sets that ship with rayembed: small BEIR folders of text outside a job's domain, named by a reserved
name (`dataset.regression: general`), so a tenant's job can name one without naming a place.

`general` is cloud API documentation (botocore's service models, Apache-2.0); `python -m rayembed.regression.build`
rebuilds it from the installed botocore (docs/evaluation.md, "The regression set").
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = ("general",)


def shipped_folder(name: str) -> Path:
    """The packaged BEIR folder of a shipped regression set; ValueError naming the choices for any other name."""
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a shipped regression set: choose one of {', '.join(SHIPPED)}")
    return Path(__file__).parent / name


def resolve(value: str | None) -> str | None:
    """A shipped set's reserved name -> its packaged folder; a path or URI as it is (a local folder called like a
    shipped set is written ./general)."""
    return str(shipped_folder(value)) if value in SHIPPED else value


def name_of(value: str | None) -> str | None:
    """How a report names a regression set: a shipped set by its reserved name, any other folder as given."""
    if value is None:
        return None
    for name in SHIPPED:
        if value == name or ("://" not in value and Path(value).resolve() == shipped_folder(name).resolve()):
            return name
    return value
