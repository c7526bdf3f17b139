"""DINOv2 through the scripts: --weights picks the family from config.json, and a run trains, evaluates,
exports and loads back like a DINOv3 one; its LoRA adapter file loads in PEFT on transformers' model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as evaluate  # noqa: E402
import export  # noqa: E402
import train  # noqa: E402
from nanopeft import load_classifier  # noqa: E402
from nanopeft.files.backbone import backbone_family  # noqa: E402
from nanopeft.inference.predict import run_classifier  # noqa: E402

FLAGS = ["--image-size", "28", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--lr", "1e-3",
         "--rank", "4", "--epochs", "1"]


@pytest.fixture(scope="module")
def dinov2_ckpt(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                                     image_size=28, patch_size=14)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():  # non-trivial LayerScale and biases
        for name, p in model.named_parameters():
            if "lambda1" in name or name.endswith("bias"):
                p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("dinov2-reg")
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_dinov2_run_end_to_end(method, dinov2_ckpt, train_images, tmp_path):
    assert backbone_family(dinov2_ckpt) == "dinov2"
    run = tmp_path / "run"
    train.main(["--method", method, "--weights", str(dinov2_ckpt), "--data", str(train_images), "--out", str(run),
                *FLAGS])
    summary = json.loads((run / "summary.json").read_text())
    m = evaluate.main(["--run", str(run), "--split", "val", "--out", str(tmp_path / "v/"), "--workers", "0",
                       "--speed-reps", "0"])
    assert m["accuracy"] == pytest.approx(summary["best_val_accuracy"], abs=1e-9)
    out = export.main(["--run", str(run), "--out", str(tmp_path / "x")])
    assert json.loads((out / "config.json").read_text())["model_type"] == "dinov2_with_registers"
    card = (out / "README.md").read_text()
    assert "transformers.Dinov2WithRegistersModel.from_pretrained" in card and "DINOv3" not in card
    ours, _ = run_classifier(run, torch.device("cpu"))
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_classifier(out)(x), ours(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dinov2_adapter_file_loads_in_peft(method, dinov2_ckpt, train_images, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    train.main(["--method", method, "--quant", "none", "--weights", str(dinov2_ckpt), "--data", str(train_images),
                "--out", str(run), *FLAGS])
    assert "transformers.Dinov2WithRegistersModel.from_pretrained" in (run / "adapter" / "README.md").read_text()
    ours, _ = run_classifier(run, torch.device("cpu"), merge="no")
    base = transformers.Dinov2WithRegistersModel.from_pretrained(dinov2_ckpt).eval()
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours.backbone(x), theirs(pixel_values=x).last_hidden_state, atol=1e-5)


def test_dinov3_placed_methods_refused_on_dinov2(dinov2_ckpt, train_images, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--method", "ssf", "--weights", str(dinov2_ckpt), "--data", str(train_images),
                    "--out", str(tmp_path / "r"), *FLAGS])
    err = capsys.readouterr().err
    assert "not supported on DINOv2" in err and not (tmp_path / "r" / "config.json").exists()  # before any work


def test_adapter_of_an_older_transformers_loads_and_hub_ids(dinov2_ckpt, train_images, tmp_path):
    """transformers <= 5.17 named DINOv2's projections attention.attention.query/key/value, attention.output.dense:
    such an adapter file is mapped on load (same outputs); the SwiGLU's fused weights_in is refused in one line."""
    from safetensors.torch import load_file, save_file

    from nanopeft.files.checkpoint_format import CheckpointError
    from nanopeft.files.save import base_model_id, load_adapter
    from nanopeft.inference.predict import read_run
    from nanopeft.training.build import build_classifier

    run = tmp_path / "run"
    train.main(["--method", "lora", "--weights", str(dinov2_ckpt), "--data", str(train_images), "--out", str(run),
                "--targets", "q_proj,v_proj,o_proj", *FLAGS])
    old = tmp_path / "old"
    old.mkdir()
    ren = lambda k: k.replace("attention.q_proj", "attention.attention.query").replace(
        "attention.v_proj", "attention.attention.value").replace("attention.o_proj", "attention.output.dense")
    save_file({ren(k): v for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items()},
              str(old / "adapter_model.safetensors"))
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text())
    conf["target_modules"] = [ren(t) for t in conf["target_modules"]]
    (old / "adapter_config.json").write_text(json.dumps(conf))
    cfg, saved = read_run(run)
    new_model, old_model = (build_classifier(cfg, saved["num_classes"], torch.device("cpu"), adapters=False).eval()
                            for _ in range(2))
    load_adapter(new_model.backbone, run / "adapter", head=new_model.head)
    load_adapter(old_model.backbone, old, head=old_model.head)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(new_model(x), old_model(x))
    conf["target_modules"] = ["mlp.weights_in"]
    (old / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="fused gate"):
        load_adapter(build_classifier(cfg, saved["num_classes"], torch.device("cpu"), adapters=False).backbone, old)
    # a released DINOv2's hub id names the adapter's base model; a tiny one keeps its path
    base = tmp_path / "dinov2-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12}))
    assert base_model_id(base) == "facebook/dinov2-base" and base_model_id(dinov2_ckpt) == str(dinov2_ckpt)
