"""numpy <-> Arrow for numeric columns through their buffers, without pyarrow's pandas probe.

In pyarrow 26, ``Array.to_numpy``, ``np.asarray(array)`` and ``pa.array(ndarray)`` (or of a Python list) first
import pandas when it is installed, to check whether the value is a pandas object: +0.3 s and +49 MiB in a
process that never uses pandas (``kdpipe select`` of 2M images peaked at ~500 MiB, a tenth of it pandas).
These two functions convert plain numeric data from and to the buffers directly: zero-copy where the layout
allows, a copy to concatenate chunks or unpack booleans. Anything else (nulls, strings, nested types) goes
through pyarrow's own conversion.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column (integers or floats, no nulls) as one ndarray; other columns as ``to_numpy`` gives them."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    if pa.types.is_boolean(values.type):
        parts = [_bits(chunk) for chunk in chunks]
        dtype = np.dtype(bool)
    elif pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        dtype = np.dtype(values.type.to_pandas_dtype())
        parts = [chunk.to_numpy(zero_copy_only=False) if chunk.null_count else
                 np.frombuffer(chunk.buffers()[1], dtype, len(chunk), chunk.offset * dtype.itemsize)
                 for chunk in chunks]
    else:
        return values.to_numpy(zero_copy_only=False)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _bits(chunk: pa.BooleanArray) -> np.ndarray:
    """A boolean chunk (bit-packed, nulls as pyarrow converts them) as a bool ndarray."""
    if chunk.null_count:
        return chunk.to_numpy(zero_copy_only=False)
    bits = np.unpackbits(np.frombuffer(chunk.buffers()[1], np.uint8), bitorder="little")
    return bits[chunk.offset:chunk.offset + len(chunk)].astype(bool)


def to_arrow(values: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """A 1-D numeric ndarray as an Arrow array sharing its memory (cast first to ``type`` when given)."""
    if type is not None:
        values = values.astype(type.to_pandas_dtype(), copy=False)
    values = np.ascontiguousarray(values)
    if values.dtype.kind not in "iuf":
        return pa.array(values, type)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])
