"""train.py against faults: SIGKILL at any moment then --resume, a full disk, a crafted resume.pt, two
processes on one run folder, --overwrite. Runs train.py in child processes (this file is also the child's
script: `python tests/test_resume.py FAULT N train-args...` kills itself at the N-th such event), so a
kill is a real SIGKILL and a file-size limit a real one."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from nanopeft.training.resume import read_resume  # noqa: E402
from nanopeft.training.run_folder import lock_path, staging_path  # noqa: E402

# 29 training images × 3 per epoch = 11 micro-batches of 8 = 6 steps of 2 (the last one short); checkpoints
# at steps 4 (mid-epoch 1), 6 (epoch 1's end), 8 (mid-epoch 2) and 12 (the end). Dropout and the RoPE
# rescale draw from the global RNG, so a resume that restored it wrongly would diverge.
RUN = ["--method", "dora", "--targets", "q_proj,v_proj", "--epochs", "2", "--ckpt-every", "4", "--grad-accum", "2",
       "--image-size", "32", "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--eval-batch-size", "32",
       "--rank", "4", "--dropout", "0.1"]
TIMING = ("images_per_s", "elapsed_s", "peak_memory_mb")  # the only metrics that may differ between runs
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # same threads, same bits


@pytest.fixture(scope="module")
def data(train_images):
    return train_images


@pytest.fixture(scope="module")
def weights(own_tiny_ckpt):
    return own_tiny_ckpt()


def child(fault, n, *args, limit_bytes=None, wait=True):
    """train.py in a child process that SIGKILLs itself at the n-th `fault` event ("none": never)."""
    def limit():  # a file-size limit: writes past it fail with EFBIG (SIGXFSZ ignored, else it kills)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    cmd = [sys.executable, __file__, fault, str(n), *map(str, args)]
    p = subprocess.Popen(cmd, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=limit if limit_bytes else None)
    if not wait:
        return p
    out, err = p.communicate(timeout=600)
    return p.returncode, out, err


def adapter_file(run):
    """(metadata, tensors) of a run's adapter_model.safetensors. Not its raw bytes: safetensors writes the
    metadata in hash-map order, which differs from process to process."""
    from safetensors import safe_open

    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def as_bytes(t):  # compare bits, not values: -0.0 and 0.0 differ, NaN equals itself
    return t.contiguous().reshape(-1).view(torch.uint8)


def metric_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # a torn line fails here
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, data, weights):
    """One run killed seven times (seeded moments: mid-epoch, in a checkpoint write, in validation, in a
    metrics line, at a random wall-clock time) and resumed each time, beside the same run uninterrupted."""
    tmp = tmp_path_factory.mktemp("killed")
    ref, run = tmp / "reference", tmp / "interrupted"
    common = ["--weights", weights, "--data", data, *RUN]
    t0 = time.perf_counter()
    rc, _, err = child("none", 0, "--out", ref, *common)
    assert rc == 0, err[-2000:]
    duration = time.perf_counter() - t0
    rng, log = random.Random(0), []
    plan = [("step", rng.randint(1, 3)),      # before the first resume point: --resume starts from the beginning
            ("checkpoint", 2),                # inside the 2nd resume.pt write (epoch 1's end); step 4's is kept
            ("validation", 1),                # during epoch 1's validation
            ("metrics", rng.randint(2, 6)),   # half-way through a metrics.jsonl line
            ("step", rng.randint(2, 4)),      # mid-epoch, after backward, before the optimizer step
            ("clock", rng.uniform(0.3, 0.9))]  # at a random moment of the run's wall time
    for i, (fault, n) in enumerate(plan):
        args = ["--out", run, *common] if i == 0 else ["--resume", run]
        if fault == "clock":
            p = child("none", 0, *args, wait=False)
            time.sleep(n * duration)
            p.kill()
            p.communicate()
            rc = p.returncode
        else:
            rc, _, err = child(fault, n, *args)
        checkpoint = read_resume(run)
        log.append((fault, n, rc, None if checkpoint is None else checkpoint["state"]["step"]))
        if i == 0:
            assert rc == -signal.SIGKILL and checkpoint is None, (rc, err[-2000:])
    rc, out, err = child("none", 0, "--resume", run, "--workers", "1")  # a runtime flag may change
    assert rc == 0, err[-2000:]
    return {"ref": ref, "run": run, "log": log, "weights": weights, "data": data}


@pytest.mark.slow
def test_interrupted_training(killed_run, reliability_case):
    ref, run, log = killed_run["ref"], killed_run["run"], killed_run["log"]
    case = reliability_case["id"]
    if case == "kill-resume-identical":
        (ma, a), (mb, b) = adapter_file(ref), adapter_file(run)
        assert ma == mb and a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a), log  # bit for bit
        ta, tb = read_resume(ref)["trainable"], read_resume(run)["trainable"]
        assert ta.keys() == tb.keys() and all(torch.equal(as_bytes(ta[k]), as_bytes(tb[k])) for k in ta)
        assert [entry[2] for entry in log[:-1]] == [-signal.SIGKILL] * (len(log) - 1), log
    elif case == "kill-metrics-clean":
        assert metric_rows(run) == metric_rows(ref)  # no torn, lost or replayed line
        assert not list(run.glob(".*.tmp-*")) and not list((run / "adapter").glob(".*.tmp-*"))
    elif case == "resume-no-checkpoint":
        assert log[0][3] is None  # killed before its first resume point, and yet identical (above)
        assert "no resume point yet, starting from the beginning" in (run / "train.log").read_text()
    elif case == "kill-during-checkpoint":
        assert log[1][0] == "checkpoint" and log[1][3] == 4  # the torn write left step 4's resume.pt
    elif case == "resume-finished":
        before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in run.rglob("*") if f.is_file()}
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run)], env=CHILD_ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "the run is complete" in r.stdout, r.stderr[-2000:]
        assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in run.rglob("*") if f.is_file()} == before
        assert not lock_path(run).exists()
    else:
        raise AssertionError(case)


def test_crafted_resume_pickle_never_runs(tmp_path, data, weights, capsys, reliability_case):
    """A resume.pt whose pickle would create a file: refused by weights_only=True, the file never appears."""
    run = tmp_path / "shared-run"
    run.mkdir()
    from nanopeft.config import TrainConfig

    cfg = TrainConfig(weights=str(weights), data=str(data), out=str(run), epochs=1)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "class_names": ["a", "b", "c"]}))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"trainable": {}, "optimizer": {}, "scaler": {}, "state": Evil(), "rng": torch.get_rng_state()},
               run / "resume.pt")
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and not marker.exists()
    assert len(err.splitlines()) == 1 and str(run / "resume.pt") in err and "Traceback" not in err, err


@pytest.mark.slow
def test_disk_full_during_checkpoint(tmp_path, data, weights, capsys, reliability_case):
    """A file-size limit below resume.pt's size: the run stops with one line naming the file; the previous
    checkpoint is kept whole and still resumes to the end."""
    run = tmp_path / "run"
    common = ["--weights", weights, "--data", data, *RUN]
    train.main(["--out", str(run), *map(str, common), "--max-steps", "3"])  # resume.pt at step 3 (mid-epoch 1)
    before = (run / "resume.pt").read_bytes()
    rc, _, err = child("none", 0, "--resume", run, "--max-steps", "0", limit_bytes=len(before) // 2)
    lines = err.strip().splitlines()
    assert rc != 0 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"error: cannot write {run}") and "disk full" in lines[-1], lines[-1]
    assert (run / "resume.pt").read_bytes() == before  # the old checkpoint, whole
    assert not list(run.glob(".*.tmp-*"))
    assert read_resume(run)["state"]["step"] == 3
    capsys.readouterr()
    summary = train.main(["--resume", str(run), "--max-steps", "0"])
    assert summary["steps"] == 12


def test_run_folder_guard(tmp_path, data, weights, capsys, reliability_case):
    case = reliability_case["id"]
    out = tmp_path / "run"
    args = ["--out", str(out), "--method", "lora", "--targets", "q_proj", "--weights", str(weights), "--data", str(data),
            *map(str, RUN[RUN.index("--image-size"):]), "--epochs", "1"]
    if case == "folder-not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        with pytest.raises(SystemExit) as e:
            train.main(args)
        err = capsys.readouterr().err
        assert e.value.code != 0 and "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
        assert [f.name for f in out.iterdir()] == ["notes.txt"]
    elif case == "overwrite-fails-to-start":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        with pytest.raises(SystemExit) as e:  # diverges at its first steps, before any checkpoint
            train.main([*args, "--overwrite", "--lr", "1e12"])
        assert e.value.code != 0 and "step" in capsys.readouterr().err
        assert [f.name for f in out.iterdir()] == ["notes.txt"]  # the old run, untouched
        train.main([*args, "--overwrite"])  # the leftover staging folder is cleaned; this run replaces the old
        assert not (out / "notes.txt").exists() and (out / "resume.pt").is_file()
        assert not staging_path(out).exists() and not lock_path(out).exists()
        assert "--overwrite: the new run replaced" in (out / "train.log").read_text()
    elif case == "two-processes":
        first = child("none", 0, *args[:-2], "--epochs", "3", wait=False)
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run while the second one tries
        try:
            for extra in ([], ["--overwrite"]):
                with pytest.raises(SystemExit) as e:
                    train.main([*args, *extra])
                err = capsys.readouterr().err
                assert e.value.code != 0 and f"another train.py (pid {first.pid})" in err, err
            with pytest.raises(SystemExit):
                train.main(["--resume", str(out)])
            assert f"pid {first.pid}" in capsys.readouterr().err
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-2000:]  # the first is unharmed
        assert len(metric_rows(out)) > 3 and (out / "summary.json").is_file() and not lock_path(out).exists()
    else:
        raise AssertionError(case)


# ----------------------------------------------------------------------------- the child process
def _kill_at(n, target, name, before=None):
    """Replace target.name by a wrapper that SIGKILLs this process at its n-th call (after `before`)."""
    real, calls = getattr(target, name), [0]

    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            if before:
                before(real, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)

    setattr(target, name, wrapper)


def _half_a_file(real, obj, f, *a, **k):  # torch.save the checkpoint, then cut it in half: a torn write
    real(obj, f, *a, **k)
    data = Path(f).read_bytes()
    Path(f).write_bytes(data[:len(data) // 2])


def _half_a_line(real, self, **row):  # write half of a metrics.jsonl row
    line = json.dumps(row) + "\n"
    self.metrics.write(line[:len(line) // 2])
    self.metrics.flush()


if __name__ == "__main__":
    from nanopeft.training.run_folder import RunLog

    fault, n = sys.argv[1], int(sys.argv[2])
    targets = {"step": (train, "get_lr", None), "validation": (train, "evaluate", None),
               "checkpoint": (torch, "save", _half_a_file), "metrics": (RunLog, "record", _half_a_line)}
    if fault in targets:
        _kill_at(n, *targets[fault])
    train.main(sys.argv[3:])  # its error boundary prints a RunError as one line
