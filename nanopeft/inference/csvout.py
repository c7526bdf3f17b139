"""Resumable, shardable CSV output: rows appended and flushed per batch, found again after a kill, merged.

    Sink(path, header).write(rows)      append, header first if the file is new; flush() after each batch
    complete_rows(path, header)         (offset, line) of every complete row; a torn last line is cut off
    locate_rows(...)                    {input index: (file, offset, indexed)} over OUT and the work files
    merge_rows(out, header, loc, n)     OUT rewritten atomically in input order from the located rows

Every row is one line (newlines inside a cell become spaces), so finding and merging rows reads lines and
copies bytes: memory holds one offset per image, never the rows themselves. Work files (one per process)
start each line with the input index; OUT, written directly by a single process, carries none: its k-th
row for a path is that path's k-th occurrence in the input.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from pathlib import Path


def csv_line(cells) -> bytes:
    """One CSV row as csv.writer writes it (quoted where needed, \r\n-terminated). Newlines inside a
    cell become spaces: every row is one line, so resuming and merging can work line by line."""
    buf = io.StringIO()
    csv.writer(buf).writerow([str(c).replace("\r", " ").replace("\n", " ") for c in cells])
    return buf.getvalue().encode("utf-8")


def parse_line(line: bytes) -> list[str]:
    return next(csv.reader([line.decode("utf-8")]))


def _cut_torn_tail(path: Path) -> None:
    """A process killed mid-write leaves a last line without its newline: cut it off."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        pos = size
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == size and chunk.endswith(b"\n"):
                return
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)


def complete_rows(path: Path, header: list[str]):
    """Yield (byte offset, line) of every complete data row of a CSV this module wrote, streaming.
    The header must be the one this run writes, so a resume never mixes two formats."""
    if not path.exists() or path.stat().st_size == 0:
        return
    _cut_torn_tail(path)
    with open(path, "rb") as f:
        first = f.readline()
        if not first:
            return
        if parse_line(first) != header:
            raise ValueError(f"{path} exists with columns {parse_line(first)}, this run writes {header}: "
                             f"choose another --out or delete it")
        offset = f.tell()
        for line in f:
            yield offset, line
            offset += len(line)


class Sink:
    """Append rows to a CSV, header first if new, flushed after every batch."""

    def __init__(self, path: Path, header: list[str]):
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "ab")
        if new:
            self.f.write(csv_line(header))
            self.flush()

    def write(self, rows) -> None:
        self.f.write(b"".join(csv_line(r) for r in rows))

    def flush(self) -> None:
        self.f.flush()  # in the OS's hands: a killed process loses nothing written so far

    def close(self) -> None:
        self.f.close()


def _assign_by_path(inputs) -> dict[str, list[int]]:
    """Rows of a directly written output carry no index: the k-th row of a path is its k-th occurrence."""
    where: dict[str, list[int]] = {}
    for i, p in enumerate(inputs.paths):
        where.setdefault(p, []).append(i)
    return where


def work_files(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(glob.escape(out.name) + f".{kind}*.csv"))


def locate_rows(inputs, out: Path, header: list[str], work: list[Path], wheader: list[str],
                read_out: bool = True):
    """Where each finished image's row is: {index: (file, byte offset, has index column)}, from OUT
    itself (read_out) and the work files."""
    loc: dict[int, tuple[Path, int, bool]] = {}
    where = _assign_by_path(inputs)
    used: dict[str, int] = {}
    for off, line in complete_rows(out, header) if read_out else ():
        p = parse_line(line)[0]
        k = used.get(p, 0)
        if k < len(where.get(p, ())):
            loc[where[p][k]] = (out, off, False)
            used[p] = k + 1
    for f in work:
        for off, line in complete_rows(f, wheader):
            i = int(line.split(b",", 1)[0])
            if 0 <= i < len(inputs.paths):
                loc[i] = (f, off, True)
    return loc


def line_at(handles: dict, f: Path, off: int, indexed: bool) -> bytes:
    h = handles.get(f) or handles.setdefault(f, open(f, "rb"))
    h.seek(off)
    line = h.readline()
    return line.split(b",", 1)[1] if indexed else line


def merge_rows(out: Path, header: list[str], loc: dict, n: int) -> None:
    """Write OUT atomically from the located rows, in input order (no row missing, none repeated)."""
    missing = [i for i in range(n) if i not in loc]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} image(s) have no row after all ranks finished, e.g. #{missing[0]}")
    tmp, handles = out.with_name(f".{out.name}.tmp-{os.getpid()}"), {}
    try:
        with open(tmp, "wb") as w:
            w.write(csv_line(header))
            for i in range(n):
                w.write(line_at(handles, *loc[i]))
        os.replace(tmp, out)
    finally:
        for h in handles.values():
            h.close()
        tmp.unlink(missing_ok=True)
