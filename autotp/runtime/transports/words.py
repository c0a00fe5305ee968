"""What a shared-memory message is, in three int64 words every rank writes beside its first flag (``transports.shm``).

Word 1: kind | dtype << 8 | row width << 16; word 2: the whole tensor's bytes; word 3: forward << 32 | collective
(``collectives.Epoch``; the furthest rank's is the largest). The ranks of one collective write the same words, so
any difference is a real mismatch. A gather of pieces of different widths (a layer split unevenly) sets the
:data:`UNEVEN` flag of the kind and writes, for its row width, the full width and a digest of every rank's width
(:func:`uneven`), and for its bytes the gathered tensor's: the same on every rank that gathers the same pieces.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch

SUM, GATHER, COMPUTED, MASK = 1, 2, 3, 0x7FFFFFFF
UNEVEN = 0x80  # a kind's flag: the ranks' pieces differ in width
KINDS = {SUM: "sums", GATHER: "gathers", COMPUTED: "computes in place (an LM head) and gathers"}
DTYPES = [None] + sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
CODES = {d: i for i, d in enumerate(DTYPES) if d is not None}
_WIDE = 1 << 24  # an uneven gather's full width takes 24 bits of the row width, the digest the 23 above


def first(kind: int, dtype: torch.dtype, n: int = 0) -> int:
    """Word 1 of a message: its kind, dtype and row width (for an uneven gather, :func:`uneven`'s number)."""
    return kind | CODES.get(dtype, 0) << 8 | n << 16


def uneven(widths: Sequence[int]) -> int:
    """The row width an uneven gather writes: the full width (0 if it has 24 bits or more) and above it a digest of
    the ranks' widths, so that ranks told other widths (``4,3`` and ``3,4``) differ.

    >>> uneven((4, 3)) & 0xFFFFFF, uneven((4, 3)) == uneven((3, 4))
    (7, False)
    """
    total = sum(widths)
    return (total if total < _WIDE else 0) | (zlib.crc32(",".join(map(str, widths)).encode()) & 0x7FFFFF) << 24


def where(i: int) -> str:
    """Which collective the third word names."""
    forward, n = i >> 32, i & MASK
    return f"collective {n} of forward {forward}" if forward else f"collective {n} before any forward"


def what(w: tuple[int, int, int]) -> str:
    """What a rank's words say it sends: ``sums 16384 bytes of float32``."""
    kind, flag, dtype = w[0] & 0x7F, w[0] & UNEVEN, DTYPES[w[0] >> 8 & 0xFF]
    n = (w[0] >> 16) % _WIDE if flag else w[0] >> 16
    if kind not in KINDS:
        return "sends a message without words"
    name, size = (str(dtype).removeprefix("torch."), dtype.itemsize) if dtype is not None else ("an unknown dtype", 0)
    if kind == SUM or not n * size:
        return f"{KINDS[kind]} {w[1]} bytes of {name}"
    pieces = f" in pieces of uneven widths (digest {w[0] >> 40:#x})" if flag else ""
    return f"{KINDS[kind]} {w[1] // (n * size)} rows of {n} {name}{pieces} ({w[1]} bytes)"
