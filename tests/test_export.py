"""export.py: the folder loads in transformers (features equal), in bitsandbytes (NF4), and as a classifier."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from nanopeft.inference.export import export_run, load_classifier  # noqa: E402
from nanopeft.inference.predict import run_classifier  # noqa: E402

pytestmark = pytest.mark.slow


def pixels(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense(tiny_run, tmp_path_factory):
    run = tiny_run("lora")
    out = tmp_path_factory.mktemp("export") / "dense"
    export.main(["--run", str(run), "--out", str(out)])
    return run, out


def test_transformers_loads_the_merged_backbone(dense):
    transformers = pytest.importorskip("transformers")
    run, out = dense
    hf, info = transformers.DINOv3ViTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours, _ = run_classifier(run, torch.device("cpu"), torch.float32)  # what eval.py runs (merged)
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=x).last_hidden_state, ours.backbone(x), atol=1e-4, rtol=1e-4)
    conf = json.loads((out / "config.json").read_text())
    assert conf["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"} and conf["label2id"]["class_2"] == 2
    pre = conf["nanopeft"]["preprocessing"]
    assert pre["image_size"] == 32 and pre["pooling"] == "cls" and pre["mean"] == [0.485, 0.456, 0.406]
    assert hf.config.id2label[1] == "class_1"


def test_load_classifier_logits_equal_eval(dense):
    run, out = dense
    model = load_classifier(out)
    ours, saved = run_classifier(run, torch.device("cpu"), torch.float32)
    x = pixels(4)
    assert not model.training and model.class_names == saved["class_names"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    assert "class_0" in card and "validation accuracy" in card and "load_classifier" in card


def test_nf4_export_loads_in_transformers_bitsandbytes_and_nanopeft(dense, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from nanopeft import load_dinov3

    run, dense_dir = dense
    out = tmp_path / "nf4"
    export_run(run, out, quantize="nf4")
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert "pip install bitsandbytes accelerate" in (out / "README.md").read_text()  # every package it needs
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("layer.0.mlp.up_proj.weight").dtype == torch.uint8
    for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"):
        assert f"layer.1.attention.q_proj.weight{suffix}" in keys
    hf, info = transformers.DINOv3ViTModel.from_pretrained(out, device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(type(m).__name__ == "Linear4bit" for m in hf.modules()) == 14  # 7 per SwiGLU block
    hf.train()  # bnb repacks CPU weights in eval mode (docs/NF4.md, "bitsandbytes CPU traps"): compare as stored
    ours = load_dinov3(out)
    assert type(ours.layer[0].attention.q_proj).__name__ == "NF4Linear"
    for name, module in hf.named_modules():
        if type(module).__name__ == "Linear4bit":
            xin = torch.randn(3, module.in_features)
            with torch.no_grad():
                torch.testing.assert_close(ours.get_submodule(name.removeprefix("model."))(xin), module(xin))
    # the bytes are bitsandbytes' own quantization of the dense export
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.DINOv3ViTModel.from_pretrained(dense_dir, quantization_config=cfg, device_map="cpu").train()
    ref.save_pretrained(tmp_path / "ref")
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(tmp_path / "ref" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    # and its classifier is the dense export's with the backbone quantized on load
    requant = load_classifier(dense_dir)
    requant.backbone = load_dinov3(dense_dir, quantize="nf4")
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(out)(x), requant(x), atol=1e-6, rtol=0)


def test_bf16_export(dense, tmp_path):
    run, dense_dir = dense
    out = export_run(run, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("layer.0.attention.q_proj.weight").dtype == torch.bfloat16
    with safe_open(out / "head.safetensors", "pt") as f:
        assert f.get_tensor("0.weight").dtype == torch.float32  # the head stays fp32
    model = load_classifier(out)
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_classifier(dense_dir)(x), atol=0.1, rtol=0.05)


def test_existing_folder_is_not_overwritten(dense, tmp_path, capsys):
    run, _ = dense
    out = tmp_path / "x"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        export.main(["--run", str(run), "--out", str(out)])
    assert "--overwrite" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"
    export.main(["--run", str(run), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "head.safetensors",
                                                     "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_scratch_baseline_exports_in_its_own_format(tiny_run, tmp_path):
    run = tiny_run("resnet18")
    out = export_run(run, tmp_path / "r18")
    conf = json.loads((out / "config.json").read_text())
    assert conf["nanopeft"]["kind"] == "scratch" and conf["model_type"] == "nanopeft_scratch"
    assert "transformers cannot" in (out / "README.md").read_text()
    model = load_classifier(out)
    ours, _ = run_classifier(run, torch.device("cpu"), torch.float32)
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--quantize nf4 applies to DINOv3"):
        export_run(run, tmp_path / "q", quantize="nf4")


@pytest.mark.parametrize("native_bf16", ["0", "1"], ids=["cpu-without-bf16", "cpu-with-bf16"])
def test_one_image_one_answer(dense, tmp_path, monkeypatch, native_bf16):
    """Default flags: eval.py, predict.py --run, predict.py --model EXPORT and load_classifier(EXPORT) compute
    the same fp32 arithmetic on CPUs with and without native bf16, at any batch size."""
    import csv

    import eval as evaluate
    import predict
    from nanopeft.data.folders import make_demo_dataset
    from nanopeft.inference.predict import ImageFiles, list_inputs

    monkeypatch.setenv("NANOPEFT_CPU_BF16", native_bf16)
    run, out = dense
    data = make_demo_dataset(tmp_path / "imgs", num_classes=3, per_class=3, size=(40, 32), seed=5)
    m = evaluate.main(["--run", str(run), "--data", str(data), "--out", str(tmp_path / "e" / "metrics.json"),
                       "--workers", "0", "--speed-reps", "0", "--batch-size", "4"])
    assert m["precision"] == "fp32"
    ev = {r["path"]: (r["prediction"], float(r["confidence"]))
          for r in csv.DictReader(open(tmp_path / "e" / "predictions.csv"))}
    rows = {}
    for name, src, bs in [("run", ["--run", str(run)], "32"), ("export", ["--model", str(out)], "32"),
                          ("export-b1", ["--model", str(out)], "1")]:
        predict.main([*src, "--data", str(data), "--out", str(tmp_path / f"{name}.csv"), "--workers", "0",
                      "--batch-size", bs])
        rows[name] = {r["path"]: (r["label"], float(r["prob"])) for r in csv.DictReader(open(tmp_path / f"{name}.csv"))}
        assert "precision=fp32" in (tmp_path / f"{name}.csv.log").read_text()
    model = load_classifier(out)
    inputs = list_inputs(data)
    x = torch.stack([ImageFiles(inputs.files, [i], 32)[0][0] for i in range(len(inputs.files))])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    rows["load_classifier"] = {p: (model.class_names[int(q.argmax())], float(q.max())) for p, q in zip(inputs.paths, probs)}
    assert len(ev) == 9
    for name, got in rows.items():
        assert set(got) == set(ev), name
        for path, (label, prob) in got.items():
            assert label == ev[path][0] and abs(prob - ev[path][1]) < 1e-4, (name, path, ev[path], (label, prob))


def test_predict_with_the_export_equals_predict_with_the_run(dense, tmp_path):
    import csv

    import predict
    from nanopeft.data.folders import make_demo_dataset

    run, out = dense
    data = make_demo_dataset(tmp_path / "imgs", num_classes=3, per_class=2, size=(40, 32), seed=3)
    common = ["--data", str(data), "--workers", "0", "--top-k", "3"]
    predict.main(["--model", str(out), "--out", str(tmp_path / "a.csv"), *common])
    predict.main(["--run", str(run), "--out", str(tmp_path / "b.csv"), *common])
    a, b = (list(csv.DictReader(open(tmp_path / n))) for n in ("a.csv", "b.csv"))
    assert [r["label"] for r in a] == [r["label"] for r in b] and len(a) == 6
    assert all(abs(float(x["prob"]) - float(y["prob"])) < 1e-5 for x, y in zip(a, b))


def test_scripts_report_damaged_files_in_one_line(dense, tmp_path, capsys, reliability_case):
    """The scripts' one error boundary (nanopeft/cli.py): a damaged run or export is one line and exit 2."""
    import shutil

    import eval as evaluate
    import predict
    from nanopeft.data.folders import make_demo_dataset

    case = reliability_case["id"]
    run0, out0 = dense
    run, model = tmp_path / "run", tmp_path / "export"
    shutil.copytree(run0, run)
    shutil.copytree(out0, model)
    data = make_demo_dataset(tmp_path / "imgs", num_classes=3, per_class=1, size=(40, 32), seed=1)

    def cut(f):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    if case == "scripts-adapter-truncated":
        cut(run / "adapter" / "adapter_model.safetensors")
        named = "adapter_model.safetensors"
    elif case == "scripts-adapter-config-not-json":
        (run / "adapter" / "adapter_config.json").write_text("{not json")
        named = "adapter_config.json"
    elif case == "scripts-run-config-not-json":
        (run / "config.json").write_text("{not json")
        named = "config.json"
    elif case == "scripts-backbone-missing":
        conf = json.loads((run / "config.json").read_text())
        conf["train"]["weights"] = str(tmp_path / "gone")
        (run / "config.json").write_text(json.dumps(conf))
        named = "--weights"
    elif case == "scripts-export-head-truncated":
        cut(model / "head.safetensors")
        named = "head.safetensors"
    else:
        (model / "config.json").write_text("{not json")
        named = "config.json"
    calls = ([(predict.main, ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "p.csv"),
                              "--workers", "0"])] if case.startswith("scripts-export") else
             [(evaluate.main, ["--run", str(run), "--data", str(data), "--workers", "0", "--speed-reps", "0",
                               "--out", str(tmp_path / "m.json")]),
              (predict.main, ["--run", str(run), "--data", str(data), "--out", str(tmp_path / "p.csv"), "--workers", "0"]),
              (export.main, ["--run", str(run), "--out", str(tmp_path / "x")])])
    for main, argv in calls:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], (main, err)
        assert "Traceback" not in err[0]


def test_written_files_get_the_default_mode(dense):
    """0666 & ~umask, as any new file: safetensors alone creates its files 0600."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    run, out = dense
    for f in [run / "adapter" / "adapter_model.safetensors", run / "config.json", out / "model.safetensors",
              out / "head.safetensors"]:
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f


def test_results_say_which_adapter_produced_them(dense, tmp_path, capsys):
    """eval.py names the epoch of the adapter it scores when the run is not simply finished, and records
    its id; the export's card shows test metrics only for the adapter exported; predict.py refuses to
    resume a CSV another model wrote and counts rows with an error."""
    import csv
    import shutil

    import eval as evaluate
    import predict
    from nanopeft.data.folders import make_demo_dataset
    from nanopeft.training.run_folder import save_run_weights
    from nanopeft.inference.predict import read_run, run_classifier
    from nanopeft.files.save import adapter_identity

    run0, out0 = dense
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    (run / "summary.json").unlink()  # as if still training
    data = make_demo_dataset(tmp_path / "imgs", num_classes=3, per_class=2, size=(40, 32), seed=4)
    m = evaluate.main(["--run", str(run), "--data", str(data), "--workers", "0", "--speed-reps", "0"])
    printed = capsys.readouterr().out
    ident, epoch = adapter_identity(run / "adapter")
    assert "still training" in printed and f"epoch {epoch}'s adapter" in printed
    assert m["adapter_id"] == ident and m["adapter_epoch"] == epoch == 1
    export.main(["--run", str(run), "--out", str(tmp_path / "x1")])
    assert "- test (" in (tmp_path / "x1" / "README.md").read_text()
    cfg, saved = read_run(run)  # a later epoch's adapter replaces the scored one
    model, _ = run_classifier(run, torch.device("cpu"), merge="no")
    with torch.no_grad():
        model.head[0].bias.add_(0.1)
    save_run_weights(model, cfg, run / "adapter", saved["class_names"], {"epoch": 2})
    export.main(["--run", str(run), "--out", str(tmp_path / "x2")])
    card = (tmp_path / "x2" / "README.md").read_text()
    assert "scored another adapter" in card and "- test (" not in card
    # predict.py: the same --out with another model is refused; --overwrite replaces it; errors counted
    (data / "class_0" / "broken.jpg").write_text("not an image")
    out = tmp_path / "p.csv"
    s = predict.main(["--run", str(run), "--data", str(data), "--out", str(out), "--workers", "0"])
    assert s["errors"] == 1 and "1 with an error" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        predict.main(["--model", str(tmp_path / "x2"), "--data", str(data), "--out", str(out), "--workers", "0"])
    err = capsys.readouterr().err
    assert "written by another model" in err and "--overwrite" in err
    predict.main(["--model", str(tmp_path / "x2"), "--data", str(data), "--out", str(out), "--workers", "0",
                  "--overwrite"])
    assert len(list(csv.DictReader(open(out)))) == 7 and (tmp_path / "p.csv.log").read_text().count(" start ") == 1
