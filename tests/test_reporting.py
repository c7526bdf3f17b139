"""train.py's reporting and selection: metrics.csv, curves.png, --select-metric, --config, the adapter's
model card and hub id, class weights and the balanced sampler, the scratch recipe per method.
End to end on CPU with a tiny transformers-written DINOv3 and generated image folders."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from nanopeft.data.balance import class_weights, sampling_weights  # noqa: E402
from nanopeft.config import PAPER_RUNS, PRESETS, TrainConfig  # noqa: E402
from nanopeft.data.folders import make_demo_dataset  # noqa: E402
from nanopeft.training.distributed import MicroBatchSampler  # noqa: E402
from nanopeft.training.history import EPOCH_COLUMNS, improved, keep_best, validation_scores  # noqa: E402
from nanopeft.reports.metrics import compute_metrics  # noqa: E402
from nanopeft.training.resume import LoopState  # noqa: E402
from nanopeft.files.save import base_model_id  # noqa: E402

FAST = ["--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--rank", "4",
        "--eval-batch-size", "32", "--method", "lora", "--targets", "q_proj"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("rep") / "train", num_classes=3, per_class=8, size=(40, 32),
                             seed=0)


@pytest.fixture(scope="module")
def weights(tiny_ckpt):
    return tiny_ckpt(gated=True)[0]


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory, data, weights):
    """Three epochs selected by val_loss, lr high enough for the scores to move."""
    out = tmp_path_factory.mktemp("runs") / "by-loss"
    summary = train.main(["--out", str(out), *FAST, "--weights", str(weights), "--data", str(data),
                          "--epochs", "3", "--lr", "1e-2", "--select-metric", "val_loss", "--patience", "10",
                          "--multiplier", "1"])
    return out, summary


def jsonl(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r], [r for r in rows if "val_accuracy" in r]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card, read by huggingface_hub (what the hub reads) when present."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        pytest.skip("huggingface_hub is not installed")
    return ModelCard.load(readme).data.to_dict()


# ----------------------------------------------------------------------------- metrics.csv, curves.png
def test_metrics_csv_has_a_row_per_epoch(loss_run):
    out, _ = loss_run
    rows = read_csv(out / "metrics.csv")
    steps, epochs = jsonl(out)
    assert len(rows) == 3 and tuple(rows[0]) == EPOCH_COLUMNS
    for row, e in zip(rows, epochs):
        assert int(row["epoch"]) == e["epoch"]
        for k in ("val_loss", "val_accuracy", "val_macro_f1", "peak_memory_mb"):
            assert float(row[k]) == pytest.approx(e[k], rel=1e-5)
        mine = [s for s in steps if s["epoch"] + 1 == e["epoch"]]
        assert float(row["train_loss"]) == pytest.approx(sum(s["loss"] for s in mine) / len(mine), rel=1e-5)
        assert float(row["lr"]) == pytest.approx(mine[-1]["lr"], rel=1e-5)
        assert float(row["images_per_s"]) > 0
    assert not list(out.glob(".*tmp*")), "atomic writes leave no temp files"


def test_curves_png_decodes(loss_run):
    out, _ = loss_run
    with Image.open(out / "curves.png") as img:
        img.load()
        assert img.format == "PNG" and img.size == (1280, 520)
        assert len(set(img.convert("RGB").getdata())) > 10  # drawn, not blank


def test_validation_scores_from_sums():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    cm = np.zeros((4, 4))
    np.add.at(cm, (y, p), 1)
    s = validation_scores([7.0, 2.0, *cm.ravel()], 4)
    m = compute_metrics(y, p, 4)
    assert s["val_accuracy"] == pytest.approx(m["accuracy"]) and s["val_macro_f1"] == pytest.approx(m["macro_f1"])
    assert s["val_loss"] == 3.5


def test_validation_loss_is_the_weighted_mean_torch_computes():
    """evaluate's Σ w_y·ℓ / Σ w_y over batches equals CrossEntropyLoss(weight, label_smoothing) on the whole split."""
    torch.manual_seed(0)
    logits, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    crit = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.5]), label_smoothing=0.1)

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()]

    x = torch.arange(20.0).view(20, 1, 1, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    sums, kept = train.evaluate(Fixed(), loader, torch.device("cpu"), None, crit, 3)
    assert validation_scores(sums, 3)["val_loss"] == pytest.approx(crit(logits, y).item(), rel=1e-6)
    assert sum(sums[2:]) == 20 and torch.equal(kept, logits)  # the logits, in the loader's order


# ----------------------------------------------------------------------------- --select-metric
def test_select_metric_val_loss_keeps_the_lowest_loss_epoch(loss_run):
    out, summary = loss_run
    _, epochs = jsonl(out)
    best, expect = math.inf, []
    for e in epochs:
        expect.append(e["val_loss"] < best - 1e-4)
        best = min(best, e["val_loss"]) if expect[-1] else best
    assert [e["best"] for e in epochs] == expect
    kept = min(epochs, key=lambda e: e["val_loss"])
    assert summary["best_epoch"] == kept["epoch"] and summary["select_metric"] == "val_loss"
    assert summary["best_score"] == pytest.approx(kept["val_loss"])
    assert summary["best_val_accuracy"] == pytest.approx(kept["val_accuracy"])


def test_improved_and_keep_best_follow_the_metric_direction():
    assert improved(0.5, 0.6, "val_loss", 1e-4) and not improved(0.7, 0.6, "val_loss", 1e-4)
    assert improved(0.7, 0.6, "val_accuracy", 1e-4) and not improved(0.6, 0.6, "val_macro_f1", 1e-4)
    assert improved(3.0, None, "val_loss", 0.0) and improved(math.nan, None, "val_loss", 0.0)  # first epoch
    assert improved(3.0, math.nan, "val_loss", 0.0) and not improved(math.nan, math.nan, "val_loss", 0.0)
    assert not improved(math.nan, 3.0, "val_loss", 0.0) and not improved(math.nan, 0.5, "val_accuracy", 0.0)
    state = LoopState()
    scores = [dict(val_accuracy=a, val_macro_f1=f, val_loss=v) for a, f, v in
              [(0.5, 0.4, 2.0), (0.7, 0.3, 2.5), (0.6, 0.6, 1.0), (0.8, 0.5, 1.5)]]
    kept = [keep_best(state, s, "val_loss", 1e-4, i + 1) for i, s in enumerate(scores)]
    assert kept == [True, False, True, False] and state.best_epoch == 3 and state.bad_epochs == 1
    assert state.best_val == 0.6 and state.best_score == 1.0
    state = LoopState()
    assert [keep_best(state, s, "val_macro_f1", 1e-4, i + 1) for i, s in enumerate(scores)] == [True, False, True, False]
    state = LoopState()
    assert [keep_best(state, s, "val_accuracy", 1e-4, i + 1) for i, s in enumerate(scores)] == [True, True, False, True]


def test_select_metric_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        train.main(["--select-metric", "val_f1"])
    assert "--select-metric must be one of" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --config
@pytest.mark.slow
def test_config_reproduces_a_run(tmp_path, loss_run):
    a, _ = loss_run
    b = tmp_path / "again"
    train.main(["--config", str(a / "config.json"), "--out", str(b)])
    ta, tb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((r / "config.json").read_text()) for r in (a, b))
    assert {**ca["train"], "out": ""} == {**cb["train"], "out": ""}


def test_config_flags_override_the_recorded_run(tmp_path, loss_run, capsys):
    a, _ = loss_run
    recorded = json.loads((a / "config.json").read_text())["train"]
    cfg = train.run_config(train.parse_args(["--config", str(a), "--epochs", "7", "--select-metric", "val_accuracy"]))
    assert cfg.epochs == 7 and cfg.select_metric == "val_accuracy" and cfg.out == ""  # a new run folder
    assert cfg.lr == recorded["lr"] == 1e-2 and cfg.targets == "q_proj" and cfg.weights == recorded["weights"]
    printed = tmp_path / "dry.json"  # the bare dict --dry-run prints reads too
    printed.write_text(json.dumps(recorded))
    assert train.run_config(train.parse_args(["--config", str(printed)])).lr == 1e-2
    printed.write_text(json.dumps({**recorded, "learning_rate": 1}))
    with pytest.raises(SystemExit):
        train.main(["--config", str(printed)])
    assert "learning_rate" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the adapter's model card
def test_adapter_model_card_follows_peft(loss_run, weights):
    out, _ = loss_run
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(weights)  # the tiny model is no release: its path
    meta = front_matter(out / "adapter" / "README.md")
    assert meta["library_name"] == "peft" and meta["base_model"] == str(weights)
    assert f"base_model:adapter:{weights}" in meta["tags"] and "lora" in meta["tags"]
    text = (out / "adapter" / "README.md").read_text()
    assert "class_0" in text and "val_loss" in text


def test_base_model_id_names_the_released_sizes(tmp_path):
    for name, preset in PRESETS.items():
        if name == "tiny":
            continue
        folder = tmp_path / f"my-{name}-copy"  # detected from config.json, whatever the folder is called
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(preset.to_dict()))
        assert base_model_id(folder) == f"facebook/dinov3-{name}-pretrain-lvd1689m"
    assert base_model_id("weights/dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth") == \
        "facebook/dinov3-vit7b16-pretrain-lvd1689m"  # Meta's .pth: no config.json, the name says
    assert base_model_id("w/dinov3-vitl16-pretrain-sat493m") == "facebook/dinov3-vitl16-pretrain-sat493m"
    meta = tmp_path / "weights"  # a folder holding one Meta .pth
    meta.mkdir()
    (meta / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth").write_bytes(b"")
    assert base_model_id(meta) == "facebook/dinov3-vits16plus-pretrain-lvd1689m"
    tiny = tmp_path / "dinov3-vit7b16-but-tiny"  # its config.json is no release: the path stays
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps(PRESETS["tiny"].to_dict()))
    assert base_model_id(tiny) == str(tiny)
    assert base_model_id("/data/my_vit") == "/data/my_vit"


def test_saved_adapter_of_a_release_carries_its_hub_id(tmp_path, weights):
    from nanopeft.training.build import build_classifier
    from nanopeft.training.run_folder import save_run_weights

    cfg = TrainConfig(method="lora", targets="q_proj", rank=4, weights=str(weights), quant="none").resolved()
    model = build_classifier(cfg, 3, torch.device("cpu"))
    release = tmp_path / "weights" / "dinov3-vit7b16"
    release.mkdir(parents=True)
    (release / "config.json").write_text(json.dumps(PRESETS["vit7b16"].to_dict()))
    cfg.weights = str(release)
    save_run_weights(model, cfg, tmp_path / "adapter", ["a", "b", "c"], {"epoch": 2, "val_accuracy": 0.5})
    hub = "facebook/dinov3-vit7b16-pretrain-lvd1689m"
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == hub
    assert front_matter(tmp_path / "adapter" / "README.md")["base_model"] == hub
    mine = tmp_path / "adapter" / "README.md"
    mine.write_text("my own notes")  # a README the user wrote is never replaced
    save_run_weights(model, cfg, tmp_path / "adapter", ["a", "b", "c"])
    assert mine.read_text() == "my own notes"


# ----------------------------------------------------------------------------- imbalanced folders
def test_class_weights_are_n_over_C_n_c():
    w = class_weights([8, 2, 2])
    assert torch.allclose(w, torch.tensor([12 / 24, 12 / 6, 12 / 6]))
    assert (w * torch.tensor([8, 2, 2])).sum() == pytest.approx(12)  # mean weight 1 over the images
    assert torch.equal(class_weights([8, 2, 2], sampler="balanced"), torch.ones(3))  # not balanced twice
    assert torch.allclose(class_weights([6, 0, 2]), torch.tensor([8 / 12, 0.0, 8 / 4]))  # C = classes present


def test_balanced_sampler_is_seeded_sharded_and_resumable():
    labels = [0] * 60 + [1] * 15 + [2] * 5
    w = sampling_weights(labels)
    one = MicroBatchSampler(80, 8, seed=3, weights=w)
    one.set_epoch(2)
    full = list(one)
    drawn = torch.bincount(torch.tensor([labels[i] for b in full for i in b]), minlength=3)
    assert len(full) == 10 and drawn.min() >= 14  # about 80/3 each, where uniform would give ~5 of class 2
    again = MicroBatchSampler(80, 8, seed=3, weights=w)
    again.set_epoch(2)
    assert list(again) == full  # seeded by (seed, epoch)
    again.set_epoch(3)
    assert list(again) != full
    again.set_epoch(2, skip=4)
    assert list(again) == full[4:]  # resume mid-epoch into the same order
    ranks = [MicroBatchSampler(80, 8, seed=3, rank=r, world=2, weights=w) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    assert [a + b for a, b in zip(*map(list, ranks))] == full  # DDP slices of the single-process batches
    with pytest.raises(ValueError, match="weights"):
        MicroBatchSampler(80, 8, seed=3, weights=w[:-1])


@pytest.mark.slow
def test_imbalanced_folder_trains_with_weights_and_balanced_sampler(tmp_path, weights):
    from nanopeft.inference.predict import run_train_priors
    from nanopeft.training.run_folder import read_run_config

    data = make_demo_dataset(tmp_path / "imb", num_classes=3, per_class=10, size=(40, 32), seed=1)
    for k, keep in ((1, 5), (2, 3)):
        for f in sorted((data / f"class_{k}").iterdir())[keep:]:
            f.unlink()
    common = [*FAST, "--weights", str(weights), "--data", str(data), "--epochs", "1", "--lr", "1e-3"]
    train.main(["--out", str(tmp_path / "bal"), *common, "--class-weights", "balanced", "--sampler", "balanced"])
    cfg, saved = read_run_config(tmp_path / "bal")
    assert saved["train_class_counts"] == {"class_0": 8, "class_1": 4, "class_2": 2}  # the 80 % split
    assert np.allclose(run_train_priors(cfg, saved), 1 / 3)  # the prior correction knows it learnt uniform
    train.main(["--out", str(tmp_path / "plain"), *common, "--max-steps", "1"])
    cfg, saved = read_run_config(tmp_path / "plain")
    assert np.allclose(run_train_priors(cfg, saved), [8 / 14, 4 / 14, 2 / 14])


# ----------------------------------------------------------------------------- recipe per method
@pytest.mark.parametrize("method", ["resnet18", "vit-small"])
def test_scratch_methods_default_to_the_scratch_recipe(method):
    cfg = train.run_config(train.parse_args(["--method", method]))
    preset = train.run_config(train.parse_args(["--preset", f"{method}-scratch"]))
    recipe = PAPER_RUNS[f"{method}-scratch"]
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.weight_decay, cfg.patience, cfg.grad_checkpointing) == \
        (32, 1, 1e-3, 1e-4, 15, "none")
    assert all(getattr(cfg, k) == getattr(preset, k) == v for k, v in recipe.items())
    flags = train.run_config(train.parse_args(["--method", method, "--lr", "3e-4", "--batch-size", "16"]))
    assert (flags.lr, flags.batch_size, flags.weight_decay) == (3e-4, 16, 1e-4)  # explicit flags win
    lora = train.run_config(train.parse_args(["--method", "lora"]))
    assert (lora.batch_size, lora.grad_accum, lora.lr, lora.grad_checkpointing) == (4, 8, 1e-4, "all")


def test_config_with_another_method_takes_that_methods_recipe(tmp_path, loss_run):
    a, _ = loss_run
    cfg = train.run_config(train.parse_args(["--config", str(a), "--method", "resnet18"]))
    assert (cfg.batch_size, cfg.lr, cfg.patience) == (32, 1e-3, 15)
    same = train.run_config(train.parse_args(["--config", str(a), "--method", "lora"]))
    assert (same.batch_size, same.lr) == (8, 1e-2)  # the recorded values: the method did not change
    scratch = train.run_config(train.parse_args(["--config", str(a), "--preset", "resnet18-scratch"]))
    back = tmp_path / "scratch.json"
    back.write_text(json.dumps(scratch.to_dict()))
    lora = train.run_config(train.parse_args(["--config", str(back), "--method", "dora"]))
    assert (lora.batch_size, lora.grad_accum, lora.lr, lora.patience, lora.grad_checkpointing) == (4, 8, 1e-4, 5, "all")
    assert lora.image_size == 32 and lora.rank == 4  # everything else as recorded
    with pytest.raises(SystemExit):
        train.main(["--config", str(a), "--resume", str(a)])


@pytest.mark.slow
def test_ddp_validation_scores_equal_single_process(tmp_path, data, weights):
    """Two gloo processes each validate half the split; the summed scores are the single process's
    (9 validation images: the ranks get 5 and 4, so an average of per-rank means would differ)."""
    import os
    import subprocess

    common = [*FAST, "--weights", str(weights), "--data", str(data), "--epochs", "1", "--multiplier", "1",
              "--dropout", "0", "--head-dropout", "0", "--rope-rescale", "none", "--quant", "none", "--lr", "1e-3",
              "--val-fraction", "0.4", "--class-weights", "balanced", "--device", "cpu"]
    train.main(["--out", str(tmp_path / "single"), *common])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "train.py"), "--out", str(tmp_path / "ddp"), *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (a,), (b,) = jsonl(tmp_path / "single")[1], jsonl(tmp_path / "ddp")[1]
    for k in ("val_accuracy", "val_macro_f1", "val_loss"):
        assert b[k] == pytest.approx(a[k], abs=1e-5), k
    assert len(read_csv(tmp_path / "ddp" / "metrics.csv")) == 1
    from nanopeft.calibration import read_val_logits  # gathered from both ranks, in the split's order

    (za, ya, pa, _), (zb, yb, pb, _) = (read_val_logits(tmp_path / r) for r in ("single", "ddp"))
    assert pa == pb and torch.equal(ya, yb) and (za - zb).abs().max() < 1e-4
