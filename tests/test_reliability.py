"""docs/RELIABILITY.md, written by the test suite, and the safetensors fuzzer.

The table of faults is tests/reliability_cases.json (one row per fault: id, area, case, outcome, test). Each
row names the test that asserts its outcome; test_reliability_doc renders the rows to docs/RELIABILITY.md and
fails if the committed file differs (NANOPEFT_WRITE_DOCS=1 rewrites it), so the table cannot drift from what is
tested. This file also runs as a script: `python tests/test_reliability.py --fuzz SEED COUNT DIR` is the fuzzer's
child process, so that a crash inside a reader fails the test instead of killing pytest.
"""

import ast
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "reliability_cases.json"
DOC = ROOT / "docs" / "RELIABILITY.md"
INTRO = """# Reliability: faults and bad input, tried

Every row is a fault or a bad input that the test suite produces and the outcome the test asserts. The
table is generated from `tests/reliability_cases.json` by `tests/test_reliability.py`, which fails when this
file differs from what it would write (rewrite it with `NANOPEFT_WRITE_DOCS=1 python -m pytest
tests/test_reliability.py`). Each row's test runs once per row, with the row's id in its test id.

Safetensors has no checksum: flipped bytes inside tensor data cannot be detected (unless they make a NaN or
an inf, which is refused). Everything structural is checked before a tensor is read.
"""


def render(rows) -> str:
    out, area = [INTRO], None
    for r in rows:
        if r["area"] != area:
            area = r["area"]
            out.append(f"\n## {area}\n\n| id | fault or input | outcome | test (pytest node id) |\n|---|---|---|---|")
        cells = [f"`{r['id']}`", r["case"], r["outcome"], f"`tests/{r['test']}[{r['id']}]`"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def functions_taking_a_case() -> dict[str, set[str]]:
    """{"test_x.py::test_y": ...} for every test function in tests/ with a `reliability_case` argument."""
    found = {}
    for f in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and "reliability_case" in [a.arg for a in node.args.args]:
                found[f"{f.name}::{node.name}"] = f
    return found


def test_reliability_doc():
    rows = json.loads(CASES.read_text())
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert all(set(r) == {"id", "area", "case", "outcome", "test"} for r in rows)
    takers = functions_taking_a_case()
    orphans = sorted({r["test"] for r in rows} - set(takers))
    assert not orphans, f"rows name tests that do not exist or take no reliability_case: {orphans}"
    idle = sorted(set(takers) - {r["test"] for r in rows})
    assert not idle, f"tests take reliability_case but no row names them: {idle}"
    areas = [r["area"] for r in rows]
    assert all(a == b or b not in areas[:i] for i, (a, b) in enumerate(zip(areas, areas[1:]))), \
        "keep each area's rows together"
    text = render(rows)
    if os.environ.get("NANOPEFT_WRITE_DOCS") == "1":
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, \
        "docs/RELIABILITY.md is stale: rerun with NANOPEFT_WRITE_DOCS=1 and commit it"


# ----------------------------------------------------------------------------- the fuzzer
def test_fuzzed_safetensors(tmp_path, reliability_case):
    """400 seeded mutations of a small safetensors file, read by both readers in a child process (faulthandler
    on: a segfault or abort prints where and fails here; a hang hits the timeout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--fuzz", "0", "400", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], report["failures"][:5]
    assert report["mutations"] == 400
    # the mutations reach both outcomes: refused with the file named, and accepted equal to safetensors
    assert report["refused"] > 200 and report["accepted"] > 20, report


def mutations(data: bytes, rng: random.Random):
    """(kind, mutated bytes) forever: truncation, header characters replaced, header bits flipped, the length
    field rewritten, non-UTF-8 bytes, data bytes flipped."""
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    alphabet = b'abcdefxyzFIU0123456789-.,:[]{}" '
    kinds = ["truncate", "replace", "flip", "length", "non-utf8", "data"]
    while True:
        kind = rng.choice(kinds)
        if kind == "truncate":
            yield kind, data[:rng.randrange(len(data))]
        elif kind == "replace":  # changed letters and digits in names, dtypes, shapes, offsets; broken syntax
            h = bytearray(header)
            for _ in range(rng.choice([1, 1, 2, 3])):
                h[rng.randrange(n)] = rng.choice(alphabet)
            yield kind, data[:8] + bytes(h) + data[8 + n:]
        elif kind == "flip":
            h = bytearray(data[:8 + n])
            h[rng.randrange(8 + n)] ^= 1 << rng.randrange(8)
            yield kind, bytes(h) + data[8 + n:]
        elif kind == "length":
            new = rng.choice([n - 1, n + 1, n + 8, len(data), len(data) - 8, 2 ** 63, rng.randrange(2 ** 64)])
            yield kind, max(new, 0).to_bytes(8, "little") + data[8:]
        elif kind == "non-utf8":
            i = rng.randrange(n)
            yield kind, data[:8 + i] + bytes([rng.randrange(0x80, 0x100)]) + data[9 + i:]
        else:  # flipped bits in tensor data: undetectable unless they make a NaN/inf
            d = bytearray(data)
            d[rng.randrange(8 + n, len(data))] ^= 1 << rng.randrange(8)
            yield kind, bytes(d)


def fuzz(seed: int, count: int, workdir: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from nanopeft.files.checkpoint import CheckpointError, SafetensorsSource

    g = torch.Generator().manual_seed(seed)
    tensors = {"embed.weight": torch.randn(4, 3, generator=g), "model.norm.bias": torch.randn(5, generator=g).bfloat16(),
               "steps": torch.arange(3), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 2),
               "half": torch.randn(2, 2, generator=g).half()}
    good = workdir / "good.safetensors"
    save_file(tensors, good, metadata={"format": "pt"})
    rng, f = random.Random(seed), workdir / "mutant.safetensors"
    stats = {"mutations": count, "refused": 0, "accepted": 0, "failures": []}
    for i, (kind, data) in zip(range(count), mutations(good.read_bytes(), rng)):
        f.write_bytes(data)
        try:
            results = [{k: t.clone() for k, t in SafetensorsSource([f], fast=fast).stream()} for fast in (True, False)]
        except CheckpointError as e:
            stats["refused"] += 1
            if str(f) not in str(e) or "\n" in str(e):
                stats["failures"].append(f"{i} {kind}: message does not name the file in one line: {e}")
            continue
        except Exception as e:  # anything else breaks the contract
            stats["failures"].append(f"{i} {kind}: {type(e).__name__}: {e}")
            continue
        stats["accepted"] += 1
        try:  # what we accept, safetensors itself must load, to the same tensors
            want = {k.removeprefix("model."): v for k, v in load_file(f).items()}
        except Exception as e:
            stats["failures"].append(f"{i} {kind}: accepted, but safetensors refuses it ({e})")
            continue
        for got in results:
            if set(got) != set(want) or not all(torch.equal(got[k], want[k]) for k in want):
                stats["failures"].append(f"{i} {kind}: accepted tensors differ from safetensors'")
    return stats


if __name__ == "__main__" and sys.argv[1:2] == ["--fuzz"]:
    seed, count, workdir = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(fuzz(seed, count, workdir)))
