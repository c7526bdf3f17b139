"""train.py end to end on CPU: a tiny DINOv3 written by transformers and a generated image folder."""

import json
import warnings
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from nanopeft.config import TrainConfig  # noqa: E402

FAST = ["--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--lr", "1e-3",
        "--eval-batch-size", "32", "--rank", "4"]


@pytest.fixture(scope="module")
def data(train_images):
    return train_images


@pytest.fixture(scope="module")
def weights(tiny_ckpt):
    return tiny_ckpt(gated=True)[0]


def run_train(tmp_path, name, *args):
    out = tmp_path / name
    summary = train.main(["--out", str(out), *FAST, *map(str, args)])
    return out, summary


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r], [r for r in rows if "val_accuracy" in r]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("lora", ["--targets", "all-linear"]), ("dora", ["--targets", "q_proj"]),
                                          ("frozen", []), ("resnet18", ["--head-dropout", "0"]),
                                          ("vit-small", ["--head-dropout", "0"])])
def test_every_method_trains_and_loss_falls(tmp_path, data, weights, method, extra):
    out, summary = run_train(tmp_path, method, "--method", method, "--weights", weights, "--data", data,
                             "--epochs", "4", "--patience", "10", *extra)
    steps, epochs = metrics(out)
    assert {"step", "loss", "lr", "images_per_s"} <= set(steps[0])
    assert {"epoch", "val_accuracy", "peak_memory_mb"} <= set(epochs[0]) and len(epochs) == 4
    losses = [s["loss"] for s in steps]
    k = max(2, len(losses) // 4)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k  # the loss falls
    files = load_file(out / "adapter" / "adapter_model.safetensors")
    assert files, "the adapter file holds the trained weights"
    if method in ("lora", "dora"):
        assert any("lora_A" in k for k in files) and any(k.startswith("base_model.model.classifier.") for k in files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class_names"] == ["class_0", "class_1", "class_2"] and cfg["train"]["method"] == method
    assert (out / "train.log").read_text().count("val accuracy") == 4
    assert summary["best_val_accuracy"] == max(e["val_accuracy"] for e in epochs)


def test_lr_schedule_warmup_is_applied():
    cfg = TrainConfig(lr=1e-4, warmup_ratio=0.03, min_lr_ratio=0.1)
    total = 1000
    lrs = [train.get_lr(s, total, cfg) for s in range(total)]
    warm = math.ceil(0.03 * total)
    assert lrs[0] == pytest.approx(1e-4 / warm)  # warmup starts near 0, not at the peak (the seed bug)
    assert lrs[warm - 1] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # cosine decays monotonically
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-3)  # ... to 0.1 × lr
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(1e-5 + 0.5 * 9e-5, rel=1e-2)


def test_logged_lr_follows_schedule(tmp_path, data, weights):
    out, _ = run_train(tmp_path, "sched", "--method", "lora", "--weights", weights, "--data", data,
                       "--epochs", "2", "--warmup-ratio", "0.25", "--quant", "none")
    steps, _ = metrics(out)
    cfg = TrainConfig(**json.loads((out / "config.json").read_text())["train"])
    assert [s["lr"] for s in steps] == pytest.approx([train.get_lr(i, len(steps), cfg) for i in range(len(steps))])
    assert steps[0]["lr"] < steps[2]["lr"]  # warmup really reaches the optimizer


def test_resume_continues_identically(tmp_path, data, weights):
    common = ["--method", "dora", "--targets", "q_proj,v_proj", "--weights", weights, "--data", data,
              "--epochs", "2", "--dropout", "0.1"]
    full, _ = run_train(tmp_path, "full", *common)
    part, _ = run_train(tmp_path, "part", *common, "--max-steps", "5")  # stops mid-epoch 1
    assert (part / "resume.pt").is_file()
    train.main(["--resume", str(part), "--max-steps", "0"])
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert metrics(full)[1][-1]["val_accuracy"] == metrics(part)[1][-1]["val_accuracy"]


def test_run_folder_is_never_overwritten(tmp_path, data, weights):
    out, _ = run_train(tmp_path, "once", "--method", "frozen", "--weights", weights, "--data", data, "--epochs", "1")
    with pytest.raises(SystemExit):
        run_train(tmp_path, "once", "--method", "frozen", "--weights", weights, "--data", data, "--epochs", "1")


def test_missing_backbone_and_data_are_short_messages(tmp_path, data, weights, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--weights", str(tmp_path / "nope"), "--data", str(data)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "huggingface-cli download" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        train.main(["--weights", str(weights), "--data", str(tmp_path / "nodata")])
    err = capsys.readouterr().err
    assert str(tmp_path / "nodata") in err and "sub-folder per class" in err


def test_bad_image_stops_before_training(tmp_path, data, weights, capsys, reliability_case):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "badrun", "--method", "frozen", "--weights", weights, "--data", bad, "--epochs", "1")
    assert e.value.code != 0
    assert "broken.jpg" in capsys.readouterr().err
    assert not (tmp_path / "badrun" / "metrics.jsonl").exists()  # nothing trained
    out, _ = run_train(tmp_path, "skipped", "--method", "frozen", "--weights", weights, "--data", bad,
                       "--epochs", "1", "--skip-bad")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    skipped = [line for line in (out / "train.log").read_text().splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and str(bad / "class_1" / "broken.jpg") in skipped[0], skipped  # listed with its reason
    assert json.loads((out / "config.json").read_text())["n_train"] + \
        json.loads((out / "config.json").read_text())["n_val"] == 36  # 37 files, the broken one left out


def test_dry_run_prints_the_papers_counts(capsys):
    train.main(["--dry-run", "--method", "lora", "--rank", "64", "--targets", "all-linear"])
    out = capsys.readouterr().out
    assert "178,257,920" in out and "4,724,745" in out and "memory model of one step" in out
    assert "NF4 weights 3.46" in out  # the 7B's frozen block Linears; the adapters' Linears are not frozen
    assert "a 16 GB GPU: fits" in out and "40 of 40 blocks" in out  # the paper's setting (nanopeft/training/memory.py)
    train.main(["--dry-run", "--method", "dora", "--rank", "16", "--targets", "q_proj"])
    assert "5,406,720" in capsys.readouterr().out
    train.main(["--list-presets"])
    listing = capsys.readouterr().out
    for count in ("2,621,440", "44,564,480", "2,785,280", "46,039,040", "179,732,480", "184,457,225"):
        assert count in listing
    assert "resnet18-scratch" in listing and "dora-all-linear-r64" in listing


def test_saved_adapter_loads_in_peft_as_the_card_shows(tmp_path, data, tiny_ckpt):
    """adapter/README.md's PEFT snippet (nanopeft.training.run_folder.peft_snippet, also in README.md), run as written:
    PEFT loads the adapter and the head without a warning and gives our classifier's logits."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    folder, _ = tiny_ckpt(gated=True)
    out, _ = run_train(tmp_path, "peft", "--method", "dora", "--targets", "all-linear", "--weights", folder,
                       "--data", data, "--epochs", "1", "--quant", "none", "--pool", "cls+mean")
    from nanopeft.training.build import build_classifier
    from nanopeft.training.run_folder import load_run_weights

    saved = json.loads((out / "config.json").read_text())
    cfg = TrainConfig(**saved["train"])  # as read from the file: build_classifier resolves it
    ours = build_classifier(cfg, saved["num_classes"], torch.device("cpu"), adapters=False)
    load_run_weights(ours, cfg, out / "adapter")
    card = (out / "adapter" / "README.md").read_text()
    code = card.split("```python\n")[-1].split("```")[0]
    x = torch.randn(2, 3, 32, 32)
    scope = {"pixel_values": x}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        exec(code, scope)  # noqa: S102 - our own card's snippet
        got = ours.eval()(x)
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert (scope["logits"] - got).abs().max() < 1e-5


def test_readme_shows_the_tested_peft_snippet():
    from nanopeft.training.run_folder import peft_snippet

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "\n".join(peft_snippet("weights/dinov3-vit7b16", "runs/<run>/adapter", 9)) in readme


@pytest.mark.slow
@pytest.mark.parametrize("method,port", [("lora", 29517), ("ssf", 29518)])  # an adapter, and the study's SSF
def test_ddp_two_gloo_processes_equal_single_process(tmp_path, data, weights, method, port):
    common = ["--method", method, "--targets", "q_proj", "--weights", str(weights), "--data", str(data),
              "--epochs", "1", "--max-steps", "3", "--dropout", "0", "--head-dropout", "0", "--rope-rescale", "none",
              "--quant", "none", *FAST, "--device", "cpu", "--lr", "1e-4"]
    single = tmp_path / "single"
    train.main(["--out", str(single), *common])
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train.py"), "--out", str(ddp), *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(single / "resume.pt", weights_only=True)["trainable"]
    b = torch.load(ddp / "resume.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


# id -> (flags, the flag the one-line error must name); every case stops before a run folder exists
BAD_ARGUMENTS = {
    "arg-rank": (["--rank", "0"], "--rank"), "arg-alpha": (["--alpha", "0"], "--alpha"),
    "arg-dropout": (["--dropout", "1.5"], "--dropout"), "arg-method": (["--method", "qlora"], "--method"),
    "arg-preset": (["--preset", "qlora-everything"], "--preset"), "arg-pool": (["--pool", "max"], "--pool"),
    "arg-targets": (["--targets", "nonexistent_proj"], "--targets"),
    "arg-image-size": (["--image-size", "63"], "--image-size"),
    "arg-batch-size": (["--batch-size", "0"], "--batch-size"), "arg-grad-accum": (["--grad-accum", "0"], "--grad-accum"),
    "arg-epochs": (["--epochs", "-1"], "--epochs"), "arg-lr": (["--lr", "-0.0001"], "--lr"),
    "arg-val-fraction": (["--val-fraction", "1.0"], "--val-fraction"),
    "arg-weights": (["--weights", "NOT_A_CHECKPOINT"], "--weights"),
    "arg-resume-changed": (["--resume", "RUN", "--lr", "0.5"], "--lr"),
}


def test_bad_argument(tmp_path, data, weights, capsys, reliability_case):
    flags, flag = BAD_ARGUMENTS[reliability_case["id"]]
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("no weights here")
    run = tmp_path / "old-run"  # for --resume: a run folder whose config.json has another lr
    run.mkdir()
    saved = TrainConfig(weights=str(weights), data=str(data), out=str(run), epochs=1, lr=1e-4)
    (run / "config.json").write_text(json.dumps({"train": saved.to_dict(), "class_names": ["a", "b", "c"]}))
    flags = [str(folder) if f == "NOT_A_CHECKPOINT" else str(run) if f == "RUN" else f for f in flags]
    out = tmp_path / "new-run"
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--weights", str(weights), "--data", str(data), *FAST, "--method", "lora", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{flag} " in err or f"{flag}:" in err, err
    assert not out.exists() and not (tmp_path / ".new-run.lock").exists()  # before any run folder
    assert sorted(f.name for f in run.iterdir()) == ["config.json"]


def test_numerical_fault(tmp_path, data, weights, capsys, monkeypatch, reliability_case):
    from nanopeft.training.resume import read_resume
    from nanopeft.training.run_folder import load_run_weights

    case = reliability_case["id"]
    args = ["--method", "lora", "--targets", "q_proj", "--weights", weights, "--data", data, "--epochs", "2"]
    if case == "loss-nan":
        with pytest.raises(SystemExit) as e:
            run_train(tmp_path, "nan", *args, "--lr", "1e12")
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # the line a user sees last, under the closed progress bar
        assert e.value.code != 0 and err.count("error:") == 1 and "Traceback" not in err, err
        assert last.startswith("error: step ") and ("the loss is" in last or "is not finite" in last), last
    elif case == "loss-nan-after-checkpoint":
        real = train.get_lr
        monkeypatch.setattr(train, "get_lr", lambda step, total, cfg: real(step, total, cfg) if step < 11 else 1e12)
        with pytest.raises(SystemExit) as e:  # 11 steps an epoch: epoch 1 ends well, epoch 2 diverges
            run_train(tmp_path, "late", *args, "--lr", "1e-3")
        last = capsys.readouterr().err.strip().splitlines()[-1]
        out = tmp_path / "late"
        assert e.value.code != 0 and last.startswith("error: step 1") and f"Kept: {out / 'resume.pt'}" in last, last
        ck = read_resume(out)
        assert ck["state"]["step"] == 11 and all(torch.isfinite(t).all() for t in ck["trainable"].values())
        from nanopeft.training.build import build_classifier

        cfg = TrainConfig(**json.loads((out / "config.json").read_text())["train"])
        model = build_classifier(cfg, 3, torch.device("cpu"), adapters=False)
        load_run_weights(model, cfg, out / "adapter")  # the best adapter (epoch 1) loads, and is finite
        assert all(torch.isfinite(p).all() for p in model.parameters())
    elif case == "fp16-overflow":
        real = torch.amp.GradScaler
        monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, init_scale=2.0 ** 40, **k))
        out, summary = run_train(tmp_path, "fp16", *args, "--precision", "fp16", "--quant", "none", "--epochs", "1")
        skipped = [line for line in (out / "train.log").read_text().splitlines() if "fp16 overflow, step skipped" in line]
        assert summary["skipped_steps"] == len(skipped) > 0, skipped
        assert json.loads((out / "summary.json").read_text())["skipped_steps"] == len(skipped)
    else:
        raise AssertionError(case)


def test_max_steps_before_any_validation_says_so_and_suggests_no_eval(tmp_path, data, weights, capsys):
    out, summary = run_train(tmp_path, "short", "--method", "lora", "--targets", "q_proj", "--weights", weights,
                             "--data", data, "--epochs", "1", "--max-steps", "1", "--batch-size", "2")
    printed = capsys.readouterr().out
    assert summary["best_val_accuracy"] is None and summary["best_epoch"] is None
    assert "-1.0000" not in printed and "eval.py --run" not in printed and "no validation ran" in printed
    assert json.loads((out / "summary.json").read_text())["best_val_accuracy"] is None
