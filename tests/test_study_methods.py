"""The unifying study's methods end to end (train.py → eval.py → predict.py → export.py → load_classifier),
their adapter files (LayerNorm tuning against PEFT), WiSE-FT, ensembles across methods, and full fine-tuning's
refusals. Tiny runs on the tiny SwiGLU checkpoint (conftest.tiny_run)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as evaluate  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402
import train  # noqa: E402
from nanopeft import load_classifier, load_dinov3  # noqa: E402
from nanopeft.inference.predict import read_run, run_classifier  # noqa: E402
from nanopeft.methods.inject import method_tensors  # noqa: E402
from nanopeft.training.build import build_classifier  # noqa: E402

STUDY = ["bitfit", "layernorm", "ssf", "vpt", "adaptformer", "full"]
KIND = {"layernorm": "LN_TUNING", "full": "NANOPEFT", "bitfit": "NANOPEFT", "ssf": "NANOPEFT", "vpt": "NANOPEFT",
        "adaptformer": "NANOPEFT"}


def logits_of(model, x):
    with torch.no_grad():
        return model(x).float()


@pytest.mark.parametrize("method", STUDY)
def test_method_end_to_end(method, tiny_run, train_images, tmp_path):
    run = tiny_run(method)
    summary = json.loads((run / "summary.json").read_text())
    cfg, saved = read_run(run)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == KIND[method]
    # only the method's tensors and the head train
    model = build_classifier(cfg, saved["num_classes"], torch.device("cpu"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.{n}" for n in method_tensors(model.backbone)} | \
        {n for n in trainable if n.startswith("head.")} and any(n.startswith("head.") for n in trainable)
    # eval.py on the validation split scores what training scored (fp32 both: conftest's probe override)
    m = evaluate.main(["--run", str(run), "--split", "val", "--out", str(tmp_path / "v/"), "--workers", "0",
                       "--speed-reps", "0"])
    assert m["accuracy"] == pytest.approx(summary["best_val_accuracy"], abs=1e-9)
    # the export and load_classifier give the run's answers
    out = export.main(["--run", str(run), "--out", str(tmp_path / "x")])
    exported = load_classifier(out)
    ours, _ = run_classifier(run, torch.device("cpu"))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits_of(exported, x), logits_of(ours, x), atol=1e-4, rtol=1e-4)
    conf = json.loads((out / "config.json").read_text())
    if method in ("vpt", "adaptformer"):  # not linear in the weights: kept beside the backbone
        assert (out / "method.safetensors").is_file() and conf["nanopeft_added_method"]["method"] == method
    if method == "ssf":  # SSF's shift on k_proj (no bias in DINOv3) became a bias in the export
        assert conf["key_bias"] is True
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():  # a real client: transformers reads the exported backbone (VPT/AdaptFormer: without them)
        theirs = transformers.DINOv3ViTModel.from_pretrained(out).eval()(pixel_values=x).last_hidden_state
        same = torch.allclose(theirs, exported.backbone(x), atol=1e-5)
    assert same == (method not in ("vpt", "adaptformer"))
    if method == "full":  # the kept weights are a hub folder too
        kept = transformers.DINOv3ViTModel.from_pretrained(run / "adapter" / "backbone").eval()
        with torch.no_grad():
            assert torch.allclose(kept(pixel_values=x).last_hidden_state, ours.backbone(x), atol=1e-5)
    rows = {}
    for name, src in (("run", ["--run", str(run)]), ("export", ["--model", str(out)])):
        predict.main([*src, "--data", str(train_images), "--out", str(tmp_path / f"{name}.csv"), "--workers", "0"])
        rows[name] = [r["label"] for r in csv.DictReader(open(tmp_path / f"{name}.csv"))]
    assert rows["run"] == rows["export"] and len(rows["run"]) == 36


def test_layernorm_adapter_loads_in_peft_with_equal_outputs(tiny_run, tiny_ckpt):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import dataclasses

    from nanopeft.files.save import load_adapter

    run = tiny_run("layernorm")
    cfg, saved = read_run(run)  # trained on the NF4 base; compared here on the dense one, as PEFT loads it
    ours = build_classifier(dataclasses.replace(cfg, quant="none"), saved["num_classes"], torch.device("cpu"),
                            adapters=False).eval()
    load_adapter(ours.backbone, run / "adapter")
    base = transformers.DINOv3ViTModel.from_pretrained(tiny_ckpt()[0]).eval()
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = theirs(pixel_values=x).last_hidden_state
        got = ours.backbone(x)
        plain = transformers.DINOv3ViTModel.from_pretrained(tiny_ckpt()[0]).eval()(pixel_values=x).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(want, plain, atol=1e-4)  # it did train


@pytest.mark.parametrize("method", ["lora", "dora", "bitfit", "ssf", "vpt", "adaptformer"])
def test_wise_one_is_the_run_and_zero_the_pretrained_backbone(method, tiny_run, tiny_ckpt):
    run = tiny_run(method)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cfg, _ = read_run(run)
    plain, _ = run_classifier(run, torch.device("cpu"))
    one, _ = run_classifier(run, torch.device("cpu"), wise=1.0)
    zero, _ = run_classifier(run, torch.device("cpu"), wise=0.0)
    half, _ = run_classifier(run, torch.device("cpu"), wise=0.5)
    pretrained = load_dinov3(cfg.weights, quantize="nf4" if cfg.quant == "nf4" else None).eval()  # the run's base
    with torch.no_grad():
        assert torch.equal(logits_of(one, x), logits_of(plain, x))
        assert torch.allclose(zero.backbone.features(x, cfg.pool), pretrained.features(x, cfg.pool), atol=1e-5)
        assert not torch.allclose(half.backbone(x), zero.backbone(x), atol=1e-6)
        assert torch.equal(zero.head[0].weight, plain.head[0].weight)  # the fine-tuned head is kept


def test_wise_refusals(tiny_run, train_images, tmp_path, capsys):
    with pytest.raises(ValueError, match="never fine-tuned"):
        run_classifier(tiny_run("frozen"), torch.device("cpu"), wise=0.5)
    with pytest.raises(ValueError, match=r"--wise must be in \[0, 1\]"):
        run_classifier(tiny_run("lora"), torch.device("cpu"), wise=1.5)
    out = export.main(["--run", str(tiny_run("lora")), "--out", str(tmp_path / "x"), "--wise", "0.5"])
    assert json.loads((out / "config.json").read_text())["nanopeft"]["wise"] == 0.5
    with pytest.raises(SystemExit):
        predict.main(["--model", str(out), "--data", str(train_images), "--out", str(tmp_path / "p.csv"),
                      "--wise", "0.5"])
    assert "--wise with --model" in capsys.readouterr().err


def test_ensemble_across_methods_reports_members(tiny_run, tmp_path):
    runs = [tiny_run(m) for m in ("lora", "ssf", "vpt")]
    alone = [evaluate.main(["--run", str(r), "--split", "val", "--out", str(tmp_path / f"{i}/"), "--workers", "0",
                            "--speed-reps", "0"])["accuracy"] for i, r in enumerate(runs)]
    m = evaluate.main(["--ensemble", *map(str, runs), "--split", "val", "--out", str(tmp_path / "e/"),
                       "--workers", "0", "--speed-reps", "0"])
    e = m["ensemble"]
    assert [x["accuracy"] for x in e["members"]] == pytest.approx(alone, abs=1e-6)  # each as it scores alone
    assert max(alone) <= e["oracle_accuracy"] <= 1 and len(e["pairwise_disagreement"]) == 3
    assert all(0 <= v <= 1 for v in e["pairwise_disagreement"].values())


def test_full_fine_tuning_refusals(tiny_ckpt, train_images, tmp_path, capsys):
    common = ["--method", "full", "--weights", str(tiny_ckpt()[0]), "--data", str(train_images), "--workers", "0"]
    with pytest.raises(SystemExit):
        train.main([*common, "--quant", "nf4", "--out", str(tmp_path / "a")])
    assert "--quant none" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a device too small for weights + gradients + AdamW: refused before loading
        train.main([*common, "--memory-budget", "0.001", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "one training step needs about" in err and not (tmp_path / "b" / "config.json").exists()


def test_dry_run_counts_and_recipe(capsys):
    train.main(["--dry-run", "--method", "ssf", "--weights", "vitb16"])
    out = capsys.readouterr().out
    assert "adapter parameters:   205,824" in out  # docs/METHODS.md's ViT-B/16 count
    assert '"lr": 0.001' in out and '"weight_decay": 0.0001' in out  # the study's recipe, not LoRA's
    train.main(["--dry-run", "--method", "ssf", "--weights", "vitb16", "--lr", "0.003"])
    assert '"lr": 0.003' in capsys.readouterr().out  # a flag given wins


def test_resumed_study_method_ends_identical(tiny_ckpt, train_images, tmp_path):
    from safetensors.torch import load_file

    common = ["--method", "adaptformer", "--weights", str(tiny_ckpt()[0]), "--data", str(train_images),
              "--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--epochs", "2",
              "--rank", "4"]
    train.main([*common, "--out", str(tmp_path / "whole")])
    train.main([*common, "--out", str(tmp_path / "cut"), "--max-steps", "3"])
    train.main(["--resume", str(tmp_path / "cut"), "--max-steps", "0"])
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".up.weight" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
