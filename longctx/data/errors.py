"""Bad input: `DataError` (the CLI exits 2 with its message) and the bad-row rule shared by every builder.

A row that does not fit its format (missing fields, an unknown role, an empty conversation, a template that does not
render) is an error naming the file and row, or, with `data.skip_bad_rows: true`, skipped with a count per reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

BAD = "bad"  # the column a tokenizing map writes: "" for a good row, else "<kind>: <detail>"


class DataError(ValueError):
    """Bad input data; the message names the file or field and the counts."""


def drop_bad_rows(table: pa.Table, where: Callable[[int], str], skip: bool) -> pa.Table:
    """`table` without its `BAD` column; with bad rows, raise a DataError naming the first (`where(index)`: its file
    and row) or, when `skip`, leave them out and log a count per kind (`where(-1)` names the source)."""
    reasons = table.column(BAD)
    bad = np.flatnonzero(pc.not_equal(reasons, "").to_numpy(zero_copy_only=False))
    table = table.drop_columns([BAD])
    if len(bad) == 0:
        return table
    first = reasons[int(bad[0])].as_py()
    if not skip:
        raise DataError(f"{where(int(bad[0]))}: {first} ({len(bad)} of {len(reasons)} rows are bad; set "
                        "data.skip_bad_rows: true to skip them with a count)")
    kinds = Counter(reasons[int(i)].as_py().split(":", 1)[0] for i in bad)
    log.warning("%s: skipped %d of %d rows (data.skip_bad_rows): %s; the first, %s: %s", where(-1), len(bad),
                len(reasons), ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()), where(int(bad[0])), first)
    keep = np.ones(len(reasons), dtype=bool)
    keep[bad] = False
    return table.filter(pa.array(keep))
