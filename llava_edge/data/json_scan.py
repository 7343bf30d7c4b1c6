"""Find the byte spans of the elements of a top-level JSON array, streaming, with numpy.

A hand-written scanner tracking string/escape state and bracket depth, vectorised: per chunk, only
the bytes that can change the state (``"``, ``\\``, brackets) are looked at, and as arrays.

- An escaped quote is one preceded by an odd run of backslashes.
- Unescaped quotes toggle "inside a string"; brackets inside strings do not count.
- The depth is the running sum of +1 (``{`` ``[``) and -1 (``}`` ``]``); an element of the
  top-level array opens at depth 1 and ends when the depth returns to 1.

UTF-8 never puts these ASCII bytes inside a multi-byte character, so bytes are enough. State carries
from chunk to chunk (depth, inside-a-string, a trailing run of backslashes is held back), so the
result does not depend on where chunks end. Memory is a few times the chunk size, whatever the file.

Bracket kinds are not matched inside elements: a record with mismatched brackets is still a span,
and fails ``json.loads`` when read (a malformed record, reported with its id and line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError

QUOTE, BACKSLASH, OPEN_OBJ, OPEN_ARR, CLOSE_OBJ, CLOSE_ARR = 1, 2, 3, 4, 5, 6
_CODE = np.zeros(256, np.uint8)
for _byte, _code in ((b'"', QUOTE), (b"\\", BACKSLASH), (b"{", OPEN_OBJ), (b"[", OPEN_ARR),
                     (b"}", CLOSE_OBJ), (b"]", CLOSE_ARR)):
    _CODE[_byte[0]] = _code
_CODE_TABLE = _CODE.tobytes()
_BETWEEN_OK = np.zeros(256, bool)  # what may stand between elements
_BETWEEN_OK[list(b" \t\r\n,")] = True
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[^\s,\[\]{}"]+')  # what to quote in an error
_AFTER_OK = np.zeros(256, bool)  # what may follow the closing ']'
_AFTER_OK[list(b" \t\r\n")] = True


@dataclass
class _State:
    depth: int = 0
    in_string: bool = False
    closed: bool = False  # the top-level array has ended
    base: int = 0  # absolute offset of the current buffer
    line: int = 1  # line number at `base`
    gap_from: int = -1  # absolute offset where the current run between elements began (-1: none)
    pending: tuple[int, int] | None = None  # (start, line) of an element still open at chunk end
    starts: list = field(default_factory=list)
    ends: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    count: int = 0


def scan_json_array(f: BinaryIO, path: Path, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, lines) of the elements of the JSON array in ``f``, which starts with ``[``
    after optional whitespace or a UTF-8 BOM. Raises :class:`DataError` for a broken file."""
    st = _State()
    carry = b""
    while True:
        chunk = f.read(chunk_bytes)
        eof = not chunk
        buf = carry + chunk
        if not st.base and not carry and buf.startswith(b"\xef\xbb\xbf"):
            buf, st.base = buf[3:], 3
        n = len(buf)
        while not eof and n and buf[n - 1] == 0x5C:  # hold back a trailing run of backslashes:
            n -= 1  # the next chunk decides what they escape
        _scan(buf, n, st, path)
        carry = buf[n:]
        st.base += n
        if eof:
            break
    if st.depth > 1:
        raise DataError(
            f"{path}: the file ends inside record #{st.count} (which starts at byte {st.pending[0]}); "
            f"the file is truncated or not valid JSON"
        )
    if st.depth == 1:
        raise DataError(f"{path}: the file ends before the closing ']' of the record array")
    if not st.closed:
        raise DataError(f"{path}: no record array found")
    return _concat(st.starts), _concat(st.ends), _concat(st.lines)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _scan(buf: bytes, n: int, st: _State, path: Path) -> None:
    arr = np.frombuffer(buf, np.uint8, count=n)
    was_closed = st.closed
    # bytes.translate and a bool view are the fastest way here to find the few bytes that matter.
    codes = np.frombuffer(buf.translate(_CODE_TABLE), np.uint8, count=n)
    pos = np.flatnonzero(codes.view(bool))
    kind = codes[pos]

    escaped = _escaped(pos, kind)
    # Strings: unescaped quotes toggle, so a bracket is inside a string when an odd number of
    # them (with the state carried from the last chunk) came before it.
    quote = (kind == QUOTE) & ~escaped
    quotes_seen = np.cumsum(quote)
    brackets = np.flatnonzero(kind >= OPEN_OBJ)
    outside = ((quotes_seen[brackets] + st.in_string) & 1) == 0
    if len(pos):
        st.in_string = bool((quotes_seen[-1] + st.in_string) & 1)
    brackets = brackets[outside]
    bpos, bkind = pos[brackets], kind[brackets]

    # Depth: +1 for an opening bracket, -1 for a closing one.
    delta = np.where(bkind <= OPEN_ARR, 1, -1)
    depth_after = st.depth + np.cumsum(delta)
    depth_before = depth_after - delta

    # After the array only whitespace. (A string between elements is caught with the other bytes
    # between elements, below: a quote is not whitespace or a comma.)
    if was_closed and not _AFTER_OK[arr].all():
        _junk(path, buf, int(np.argmin(_AFTER_OK[arr])), st, after=True)

    # The top level: the '[' that opens the array and the ']' that closes it.
    close_top = None
    for k in np.flatnonzero((depth_before == 0) | (depth_after <= 0)):
        p = int(bpos[k])
        if depth_after[k] < 0 or (depth_after[k] == 0 and bkind[k] != CLOSE_ARR):
            raise DataError(
                f"{path}: unmatched {chr(buf[p])!r} at byte {st.base + p}; the file is not valid JSON"
            )
        if depth_before[k] == 0:
            if st.closed:
                _junk(path, buf, p, st, after=True)
            st.gap_from = st.base + p + 1
        else:
            close_top, st.closed = p, True
            if not _AFTER_OK[arr[p + 1 :]].all():
                _junk(path, buf, p + 1 + int(np.argmin(_AFTER_OK[arr[p + 1 :]])), st, after=True)

    # Elements open at depth 1 -> 2 and close at 2 -> 1; they alternate.
    opens = bpos[(delta == 1) & (depth_before == 1)].astype(np.int64)
    closes = bpos[(delta == -1) & (depth_after == 1)].astype(np.int64)
    nl = np.flatnonzero(arr == 10)
    had_pending = st.pending is not None
    starts = st.base + opens
    lines = st.line + np.searchsorted(nl, opens)
    if had_pending:
        starts = np.concatenate(([st.pending[0]], starts))
        lines = np.concatenate(([st.pending[1]], lines))
        st.pending = None
    ends = st.base + closes + 1
    if len(starts) > len(ends):  # the last element goes on in the next chunk
        st.pending = (int(starts[-1]), int(lines[-1]))
        starts, lines = starts[:-1], lines[:-1]

    # Between elements only whitespace and commas. Each run between two elements is checked in
    # the chunk where it ends; a run still open at the chunk's end is checked up to there.
    if len(opens):
        if had_pending:
            gap_from = closes[: len(opens)] + 1
        else:
            gap_from = np.concatenate(([st.gap_from - st.base], closes[: len(opens) - 1] + 1))
        _check_between(arr, gap_from, opens, buf, st, path)
    depth_end = int(depth_after[-1]) if len(depth_after) else st.depth
    if not was_closed and (depth_end == 1 or close_top is not None):
        tail_from = int(closes[-1]) + 1 if len(closes) else st.gap_from - st.base
        tail_to = close_top if close_top is not None else n
        _check_between(arr, np.array([tail_from]), np.array([tail_to]), buf, st, path)
        st.gap_from = st.base + n if close_top is None else -1

    st.depth = depth_end
    st.line += len(nl)
    st.starts.append(starts)
    st.ends.append(ends)
    st.lines.append(lines.astype(np.int64))
    st.count += len(starts)


def _escaped(pos: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Which elements are escaped: those right after a run of an odd number of backslashes."""
    escaped = np.zeros(len(pos), bool)
    backslashes = np.flatnonzero(kind == BACKSLASH)
    if not len(backslashes):
        return escaped
    # Runs of backslashes on consecutive bytes (consecutive elements too: all are specials).
    breaks = np.flatnonzero(np.diff(pos[backslashes]) != 1)
    first = np.concatenate(([0], breaks + 1))
    last = np.concatenate((breaks, [len(backslashes) - 1]))
    odd_last = backslashes[last[(last - first) % 2 == 0]]  # the last backslash of each odd run
    after = odd_last + 1
    keep = after < len(pos)
    after, odd_last = after[keep], odd_last[keep]
    escaped[after[pos[after] == pos[odd_last] + 1]] = True  # only the byte right after the run
    return escaped


_SHORT_GAP = 64


def _check_between(arr: np.ndarray, a: np.ndarray, b: np.ndarray, buf: bytes, st: _State, path: Path) -> None:
    """Raise if any byte in the runs ``arr[a[i]:b[i]]`` is not whitespace or a comma."""
    length = b - a
    for i in np.flatnonzero(length > _SHORT_GAP):  # rare: long runs one by one
        run = arr[a[i] : b[i]]
        if not _BETWEEN_OK[run].all():
            _junk(path, buf, int(a[i]) + int(np.argmin(_BETWEEN_OK[run])), st)
    short = (length > 0) & (length <= _SHORT_GAP)
    if not short.any():
        return
    a, length = a[short], length[short]
    offsets = np.arange(int(length.max()))
    at = a[:, None] + offsets
    bad = (offsets < length[:, None]) & ~_BETWEEN_OK[arr[np.minimum(at, len(arr) - 1)]]
    if bad.any():
        r, c = np.argwhere(bad)[0]
        _junk(path, buf, int(at[r, c]), st)


def _junk(path: Path, buf: bytes, p: int, st: _State, after: bool = False) -> None:
    where = "after the closing ']'" if after else "between records"
    token = _TOKEN.match(buf, p, p + 60)
    text = (token.group() if token else buf[p : p + 1]).decode("utf-8", "replace")
    raise DataError(
        f"{path}: unexpected {text!r} {where} at byte {st.base + p}; a LLaVA JSON file is an "
        f"array of record objects"
    )
