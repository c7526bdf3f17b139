"""The benchmark scripts keep running: bench/gpu.py --smoke (the GPU command's code path on CPU with a
tiny model) and bench/step.py on a tiny model, each in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOPEFT_BENCH_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_smoke_writes_json_and_markdown(tmp_path):
    pytest.importorskip("transformers")  # its reference section; the rest needs only torch
    p = run(["bench/gpu.py", "--smoke", "--out", str(tmp_path)], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (js,) = tmp_path.glob("gpu-*.json")
    r = json.loads(js.read_text())
    assert r["smoke"] and r["tests"]["ok"]
    steps = [row for row in r["steps"] if "s_per_step" in row]
    assert {row["method"] for row in steps} == {"lora", "dora"} and all(row["s_per_step"] > 0 for row in steps)
    assert any(row["method"].startswith("merged") and row["images_per_s"] > 0 for row in r["steps"])
    assert r["nf4"]["gb_per_s"] > 0 and r["reference"]["time_ratio"] > 0
    assert "| lora | 1 |" in (tmp_path / js.name.replace(".json", ".md")).read_text()


@pytest.mark.slow
def test_step_bench_runs_both_sides_on_a_tiny_model(tmp_path):
    for m in ("transformers", "peft", "bitsandbytes"):
        pytest.importorskip(m)
    out = tmp_path / "rows.json"
    p = run(["bench/step.py", "--model", "tiny", "--image-size", "32", "--method", "dora", "--steps", "1",
             "--threads", "1", "--json", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["reference"]["s_per_step"] > 0 and row["nanopeft"]["s_per_step"] > 0
    assert row["time_ratio"] > 0 and row["peak_ratio"] > 0


@pytest.mark.slow
def test_step_bench_budget_mode_plans_our_recomputation_from_the_references_peak(tmp_path):
    """--our-checkpointing budget: nanopeft's recomputed blocks come from the memory model with the
    reference's peak of the same round as budget; every round is on record; only our side runs with
    the page-aligned allocator (what train.py turns on)."""
    for m in ("transformers", "peft", "bitsandbytes"):
        pytest.importorskip(m)
    out = tmp_path / "rows.json"
    p = run(["bench/step.py", "--model", "tiny", "--image-size", "32", "--method", "lora", "--steps", "1",
             "--rounds", "2", "--threads", "1", "--our-checkpointing", "budget", "--json", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert [len(row["rounds"][s]) for s in ("reference", "nanopeft")] == [2, 2]
    blocks = row["nanopeft"]["checkpointed_blocks"]
    assert isinstance(blocks, int) and 0 <= blocks <= 2  # the tiny model has 2 blocks
    assert row["nanopeft"]["thp_allocator"] and not row["reference"]["thp_allocator"]


@pytest.mark.slow
def test_memory_bench_breaks_the_peak_down_against_the_model(tmp_path):
    out = tmp_path / "mem.json"
    p = run(["bench/memory_7b.py", "--preset", "tiny", "--image-size", "32", "--batch", "2", "--json", str(out)],
            tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    m = r["measured_gb"]
    assert r["thp_allocator"] and m["heap_growth_in_step"] is not None and m["step_peak"] > m["runtime"] > 0
    assert 0.5 < r["model_vs_step_peak"] < 2  # the runtime dominates a tiny model: a loose check only
