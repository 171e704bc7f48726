"""Are two run folders' tables identical?  Every Parquet table both folders hold is compared exactly
(same columns, same values bit for bit), with rows put in one order first (sorted by every column),
since a restructured run may compute the same rows in another order.

  python benchmarks/identity/identical_tables.py /tmp/before-quick /tmp/after-quick

Prints one line per table (identical / differs / only in one folder) and exits 1 if any shared table differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with list cells as tuples, columns in name order and rows sorted by every column."""
    frame = frame.map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)
    frame = frame[sorted(frame.columns)]
    keys = frame.astype(str)
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def difference(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """``None`` when identical, else what differs."""
    if sorted(a.columns) != sorted(b.columns):
        return f"columns {sorted(set(a.columns) ^ set(b.columns))} in one only"
    if len(a) != len(b):
        return f"{len(a)} rows against {len(b)}"
    a, b = canonical(a), canonical(b)
    for column in a.columns:
        left, right = a[column], b[column]
        missing = left.isna() & right.isna()
        same = missing | ((left == right) if left.dtype.kind in "fc" else (left.astype(str) == right.astype(str)).fillna(False))
        if not same.all():
            return f"column {column!r} differs in {int((~same).sum())} rows"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="a run folder")
    parser.add_argument("after", type=Path, help="another run folder")
    args = parser.parse_args()
    names = {p.relative_to(args.before) for p in args.before.rglob("*.parquet")} | {p.relative_to(args.after) for p in args.after.rglob("*.parquet")}
    differ = 0
    for name in sorted(names, key=str):
        if not (args.before / name).exists() or not (args.after / name).exists():
            print(f"only in {'after' if not (args.before / name).exists() else 'before'}: {name}")
            continue
        problem = difference(pd.read_parquet(args.before / name), pd.read_parquet(args.after / name))
        differ += problem is not None
        print(f"{'identical' if problem is None else 'DIFFERS'}: {name}" + (f" ({problem})" if problem else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
