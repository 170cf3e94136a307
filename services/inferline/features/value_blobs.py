"""Feast's stored feature values (serialised ``ValueProto``) as numbers: one, or a column at once.

``number`` decodes one parsed value as every read path does. ``numbers_or_nan`` decodes a
whole column of stored blobs, as a read of a view's whole table (``ReadPlan.scan``) meets
them: hundreds of thousands at a time. Parsing each blob through protobuf and Python took
~60 % of such a scan (cProfile, the demo store's 300,000 values: 0.75 of 1.2 s), though
nearly every blob is one numeric field in one of a few fixed wire shapes. Those are read
straight off the bytes, column-wise with NumPy; any other blob (a string, a list, a
timestamp, a null, anything unexpected) goes through ``number_or_nan`` as before, so the
result is the same value for value, errors included.

The wire shapes read directly (protobuf encoding; Feast's ``Value`` message, fields of the
``val`` oneof): ``double_val`` (field 5, fixed64: tag 0x29 and 8 bytes), ``float_val`` (6,
fixed32: 0x35 and 4 bytes), ``int32_val`` (3, varint: 0x18), ``int64_val`` (4, varint:
0x20) and ``bool_val`` (7, varint: 0x38), each as the blob's only field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

_DOUBLE, _FLOAT = 0x29, 0x35
_INT32, _INT64, _BOOL = 0x18, 0x20, 0x38
_MAX_VARINT = 10
"""Bytes of the longest varint (a negative int64, or a negative int32 sign-extended)."""


def number(value: ValueProto) -> float | None:
    """A stored value as a float; None when unset or null (missing). Raises for a non-numeric
    value, as Feast's own read did."""
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    return float(getattr(value, kind))


def number_or_nan(blob: bytes | None) -> float:
    """A stored serialised value as ``number`` decodes it, NaN where that is None (or no value)."""
    if blob is None:
        return math.nan
    decoded = number(ValueProto.FromString(blob))
    return math.nan if decoded is None else decoded


def numbers_or_nan(blobs: Sequence[bytes | None]) -> npt.NDArray[np.float32]:
    """``number_or_nan`` of every blob, as float32 (see the module docstring)."""
    n = len(blobs)
    out = np.full(n, np.nan, dtype=np.float32)
    if not n:
        return out
    present = [b"" if blob is None else blob for blob in blobs]
    lengths = np.fromiter(map(len, present), dtype=np.int64, count=n)
    data = np.frombuffer(b"".join(present), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    tags = np.zeros(n, dtype=np.uint8)
    some = lengths > 0
    tags[some] = data[starts[some]]
    decoded = ~some  # an empty blob holds no value: NaN, as ``number_or_nan`` says
    for tag, size, dtype in ((_DOUBLE, 8, "<f8"), (_FLOAT, 4, "<f4")):
        rows = np.flatnonzero((tags == tag) & (lengths == size + 1))
        if len(rows):
            raw = data[starts[rows, np.newaxis] + np.arange(1, size + 1)]
            with np.errstate(over="ignore"):  # a double past float32's range is inf, as one at a time
                out[rows] = np.ascontiguousarray(raw).view(dtype).reshape(-1)
            decoded[rows] = True
    for tag in (_INT32, _INT64, _BOOL):
        candidates = (tags == tag) & (lengths >= 2) & (lengths <= _MAX_VARINT + 1)
        for length in np.unique(lengths[candidates]).tolist():
            rows = np.flatnonzero(candidates & (lengths == length))
            raw = data[starts[rows, np.newaxis] + np.arange(1, length)].astype(np.uint64)
            # One varint filling the rest of the blob: every byte but its last has the
            # continuation bit. (Anything else is left to protobuf.)
            whole = ((raw[:, :-1] & 0x80) != 0).all(axis=1) & ((raw[:, -1] & 0x80) == 0)
            rows, raw = rows[whole], raw[whole]
            shifts = np.arange(length - 1, dtype=np.uint64) * np.uint64(7)
            # Bits past the 64th fall off, as protobuf's own decoder drops them.
            value = np.bitwise_or.reduce((raw & np.uint64(0x7F)) << shifts, axis=1)
            if tag == _BOOL:
                out[rows] = (value != 0).astype(np.float32)
            elif tag == _INT32:  # protobuf keeps an int32 varint's low 32 bits
                out[rows] = value.view(np.int64).astype(np.int32).astype(np.float64)
            else:
                out[rows] = value.view(np.int64).astype(np.float64)
            decoded[rows] = True
    with np.errstate(over="ignore"):
        for i in np.flatnonzero(~decoded).tolist():
            out[i] = number_or_nan(blobs[i])
    return out
