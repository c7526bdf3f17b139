"""The scripts' one error boundary: library code raises, a script's `main` prints one line and exits 2.

    @error_boundary
    def main(argv=None): ...      # train.py, eval.py, predict.py, export.py, scripts/*.py

A fault the user can fix (a missing or damaged file, a bad flag value, a full disk) reaches the user as
`error: <what, naming the file, key or flag>` on stderr and exit status 2, never as a traceback. Those are
ValueError (CheckpointError and RunError are ValueErrors), OSError (FileNotFoundError, FileExistsError,
PermissionError, a failed write) and safetensors' own error. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys

from safetensors import SafetensorError

USER_FAULTS = (ValueError, OSError, SafetensorError)


def message(e: BaseException) -> str:
    """The exception as one line (a multi-line message joined with '; ')."""
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(msg: str) -> None:
    """Print `error: msg` on stderr and exit 2, closing any progress bar first (it would swallow the line)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def error_boundary(main=None, *, cleanup=None):
    """Decorate a script's main(argv=None): USER_FAULTS become one line and exit 2 (`cleanup()` first)."""
    def wrap(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_FAULTS as e:
                if cleanup is not None:
                    cleanup()
                fail(message(e))
        return wrapped
    return wrap(main) if main is not None else wrap
