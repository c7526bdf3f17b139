"""Export a trained run as a self-contained model folder, and load one back as a ready classifier.

    export_run("runs/X", "exports/X")   (lora | dora | frozen)
        config.json         the hub's DINOv3 config + id2label / label2id + `nanopeft` (preprocessing,
                            head, training priors); + quantization_config with quantize="nf4"
        model.safetensors   the backbone with the adapters merged, hub key names (embeddings.*, layer.N.*,
                            norm.*): transformers.DINOv3ViTModel.from_pretrained(DIR) loads it as is
        head.safetensors    the classification head (make_head's Sequential keys), fp32
        README.md           model card: classes, the run's config, validation accuracy, how to load it
    (resnet18 | vit-small): the same four files in nanopeft's own format (model.safetensors holds the
        trunk, `nanopeft.kind` = "scratch"); transformers cannot load those, the card says so.

    load_classifier("exports/X")  ─►  backbone + head, eval mode, with .class_names and .preprocessing

NF4 export: each merged block Linear is re-quantized (double quantization, blocks of 64) and written as
transformers + bitsandbytes write a 4-bit model: `weight` (packed uint8), `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4` (docs/NF4.md, "Serialisation (transformers + bitsandbytes)").
The weights are cast to --dtype before quantizing, so the bytes equal what bitsandbytes makes of the
dense export in that dtype. The merged weight is rounded to NF4 once more: outputs move by about one
quantization step against the dense export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from ..files.checkpoint import parse_dtype
from ..files.checkpoint_format import default_mode, read_json, read_safetensors_header
from ..files.save import base_model_id  # the hub id of a released backbone, else its path
from ..methods.adaptformer import unwrap_adaptformer
from ..methods.inject import method_of, method_settings, method_tensors
from ..methods.vpt import unwrap_vpt

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
METHOD_FILE = "method.safetensors"  # VPT / AdaptFormer: what they add to the backbone (fp32), beside it


def densify(backbone: nn.Module) -> int:
    """Replace every NF4Linear left after merging (frozen runs, untargeted layers) by an nn.Linear
    holding Ŵ = dequantize(codes, absmax) in fp32: the weights the run computed with. Returns the count."""
    from ..nf4_linear import NF4Linear

    names = [n for n, m in backbone.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        q = backbone.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32))
            if q.bias is not None:
                lin.bias.copy_(q.bias.float())
        backbone.set_submodule(name, lin.requires_grad_(False))
    return len(names)


def requantize_blocks(backbone: nn.Module, dtype: torch.dtype) -> int:
    """Every nn.Linear inside the blocks -> NF4Linear quantized from its weight in `dtype` (compute dtype)."""
    from ..nf4_linear import NF4Linear

    names = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and n.startswith("layer.")]
    for name in names:
        lin = backbone.get_submodule(name)
        bias = lin.bias.detach().to(dtype) if lin.bias is not None else None
        backbone.set_submodule(name, NF4Linear.from_weight(lin.weight.detach().to(dtype), bias,
                                                           compute_dtype=dtype, name=f"{name}.weight"))
    return len(names)


def quantization_config(dtype: torch.dtype) -> dict:
    """config.json's `quantization_config` as transformers writes it for BitsAndBytesConfig(load_in_4bit,
    nf4, double quant, compute dtype)."""
    return {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
            "quant_method": "bitsandbytes"}


def preprocessing(image_size: int, pool: str) -> dict:
    """What a client must do to pixels before the model (docs/DINOV3.md, "Preprocessing")."""
    return {"image_size": image_size, "resize": "squash (aspect ratio not kept), bilinear, antialiased",
            "rescale_factor": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "pooling": pool}


def labels(names: list[str]) -> dict:
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


# ----------------------------------------------------------------------------- writing a folder
def _prepare_dir(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling folder; refuses a non-empty `out` unless overwrite."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite or choose another folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, out: Path) -> None:
    """Swap the finished folder in: a reader sees the old export or the new one, never a half one."""
    for f in tmp.iterdir():
        default_mode(f)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    read_safetensors_header(path)  # a damaged file fails here, naming itself, before safetensors sees it
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _val_accuracy(run: Path) -> float | None:
    summary = run / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("best_val_accuracy")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run / "metrics.jsonl").is_file() else []
    vals = [r["val_accuracy"] for r in rows if "val_accuracy" in r]
    return max(vals) if vals else None


def _dino_files(model, tmp: Path, cfg, saved: dict, dtype: torch.dtype, quantize: str | None) -> dict:
    """model.safetensors + config.json of a DINOv3 run's backbone; returns config.json's dict."""
    backbone = model.backbone
    added = method_tensors(backbone) if method_of(backbone) in ("vpt", "adaptformer") else {}
    settings = {"method": method_of(backbone), **method_settings(backbone)} if added else None
    if added:  # not linear in the weights: the plain backbone in hub keys, the added tensors beside it
        save_file({k: t.detach().float().contiguous() for k, t in added.items()}, str(tmp / METHOD_FILE),
                  metadata={"format": "pt"})
        (unwrap_vpt if settings["method"] == "vpt" else unwrap_adaptformer)(backbone)
    densify(backbone)
    backbone.to(dtype)
    if quantize == "nf4":
        requantize_blocks(backbone, dtype)
    save_file(_tensors(backbone), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    c = backbone.config
    d = {k: v for k, v in getattr(c, "extra", {}).items() if k != "quantization_config"}
    d.update(c.to_dict(), dtype=str(dtype).removeprefix("torch."), **labels(saved["class_names"]))
    if hasattr(backbone, "rope_embeddings"):  # DINOv3: SSF's merge may have added biases
        att, mlp = backbone.layer[0].attention, backbone.layer[0].mlp
        d.update(query_bias=att.q_proj.bias is not None, key_bias=att.k_proj.bias is not None,
                 value_bias=att.v_proj.bias is not None, proj_bias=att.o_proj.bias is not None,
                 mlp_bias=mlp.up_proj.bias is not None)
    if settings:
        d["nanopeft_added_method"] = {**settings, "file": METHOD_FILE}
    if quantize == "nf4":
        d["quantization_config"] = quantization_config(dtype)
    return d


def export_run(run, out, *, dtype: str = "float32", quantize: str | None = None, overwrite: bool = False,
               weights: str | None = None, calibration: str = "none", wise: float = 1.0) -> Path:
    """Write the export folder of a train.py run (see the module docstring); returns its path.
    calibration (ts | bcts | vs | auto): fitted on the run's validation logits and folded into the head's
    last Linear (calibration.fold_into_head), so the export's logits are the calibrated ones; config.json
    records it, and the mean calibrated validation posterior as the training priors label-shift EM uses."""
    from ..config import SCRATCH_METHODS
    from .predict import read_run, run_classifier, run_thresholds, run_train_priors, run_weights_file
    from ..files.save import file_identity

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {EXPORT_DTYPES}")
    if quantize not in (None, "none", "nf4"):
        raise ValueError(f"--quantize {quantize!r}: only nf4 is supported")
    quantize = None if quantize == "none" else quantize
    run, out = Path(run), Path(out)
    cfg, saved = read_run(run)
    scratch = cfg.method in SCRATCH_METHODS
    if scratch and quantize:
        raise ValueError(f"--quantize nf4 applies to DINOv3 runs; {run} is a {cfg.method} baseline")
    tdtype = parse_dtype(dtype)
    model, saved = run_classifier(run, torch.device("cpu"), torch.float32, weights=weights, merge="yes", wise=wise)
    priors, cal_block = run_train_priors(cfg, saved).tolist(), {"kind": "none"}
    if calibration not in (None, "none"):
        from ..calibration import fold_into_head, refuse_knn
        from .predict import run_calibration

        refuse_knn([cfg.method], calibration)
        cal, why, source = run_calibration(run, calibration)
        fold_into_head(model.head, cal)
        priors, cal_block = source.tolist(), {**cal.to_dict(), "why": why, "folded_into": "head's last Linear"}
    tmp = _prepare_dir(out, overwrite)
    try:
        block = {"kind": "scratch" if scratch else "dinov3", "method": cfg.method,
                 "preprocessing": preprocessing(cfg.image_size, "n/a" if scratch else cfg.pool),
                 "head": {"num_classes": len(saved["class_names"]), "dropout": cfg.head_dropout},
                 "train_priors": priors, "calibration": cal_block, "run": str(run),
                 "base_model": None if scratch else base_model_id(cfg.weights), "quantize": quantize,
                 "dtype": dtype, "adapter_id": file_identity(run_weights_file(run))[0],
                 "adapter_epoch": file_identity(run_weights_file(run))[1], "wise": wise, "task": cfg.task}
        thresholds = run_thresholds(run, saved["class_names"])  # --task multilabel: each class's, from validation
        if thresholds is not None:
            if calibration not in (None, "none"):
                raise ValueError("--calibration is a single-label (softmax) tool; this is a --task multilabel run")
            block["thresholds"] = [float(t) for t in thresholds]
        if scratch:
            model.to(tdtype)
            save_file(_tensors(model.backbone), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            conf = {"model_type": "nanopeft_scratch", "architecture": cfg.method, "dtype": dtype,
                    **labels(saved["class_names"])}
        else:
            block["head"]["in_dim"] = model.backbone.feature_dim(cfg.pool)
            block["head"]["kind"] = cfg.method if cfg.method in ("linear-probe", "knn") else "mlp"
            if cfg.method == "knn":
                block["head"].update(k=model.head.k, temperature=model.head.t)
            conf = _dino_files(model, tmp, cfg, saved, tdtype, quantize)
            block["backbone_class"] = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}.get(
                conf.get("model_type"), "DINOv3ViTModel")  # transformers' class of model.safetensors
        conf["nanopeft"] = block
        head = model.head if scratch else model.head.float()  # a scratch head runs in the trunk's dtype
        save_file(_tensors(head), str(tmp / "head.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(run, cfg, saved, conf, out.name))
        _commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- loading one back
def add_method_back(backbone: nn.Module, settings: dict, directory: Path) -> None:
    """An export's VPT prompts or AdaptFormer branch (METHOD_FILE) back into its plain backbone, frozen."""
    from ..methods.inject import add_adapters

    kw = {k: settings[k] for k in ("rank", "prompts", "adapter_scale", "dropout") if k in settings}
    method = settings.get("method")
    if method not in ("vpt", "adaptformer"):
        raise ValueError(f"{directory / 'config.json'}: nanopeft_added_method {method!r} is not vpt or adaptformer")
    add_adapters(backbone, method=method, **kw)
    tensors, _ = _read(directory / settings.get("file", METHOD_FILE))
    want = method_tensors(backbone)
    if set(tensors) != set(want):
        odd = sorted(set(tensors) ^ set(want))
        raise ValueError(f"{directory / METHOD_FILE}: {len(odd)} tensor(s) do not fit the {method} model, e.g. {odd[0]!r}")
    with torch.no_grad():
        for k, t in tensors.items():
            want[k].copy_(t)
    backbone.requires_grad_(False)


def load_classifier(directory, device="cpu", dtype=None, precision: str = "auto") -> nn.Module:
    """The ready classifier of an export folder alone (no run folder, no original backbone), in eval
    mode, computing as eval.py and predict.py do by default: `precision` is theirs (auto: fp32 on every CPU,
    bf16 autocast on a GPU with bf16; or fp32 | bf16 | fp16), and the model applies it itself. `dtype`: the
    backbone weights' dtype (default: the autocast dtype, else fp32; NF4 exports: the compute dtype). The
    module carries .class_names, .preprocessing (image_size, mean, std, pooling), .train_priors and
    .precision."""
    from ..device import inference_precision, precision_name
    from ..head import Classifier, make_head
    from ..files.backbone import load_backbone
    from ..probes import KNNProbe, LinearProbe
    from ..backbones.baselines import build_scratch

    device = torch.device(device)
    amp, _ = inference_precision(device, precision, None)
    # eval.py's arithmetic: a DINOv3 backbone in the autocast dtype (fp32 without), a scratch trunk in fp32
    weights_dtype = parse_dtype(dtype) if dtype is not None else (amp or torch.float32)
    directory = Path(directory)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (expected a folder written by export.py)")
    conf = read_json(cfg_file)
    block = conf.get("nanopeft")
    if not isinstance(block, dict) or "head" not in block:
        raise ValueError(f"{cfg_file}: no `nanopeft` section: not a folder written by export.py")
    names = [conf["id2label"][str(i)] for i in range(len(conf["id2label"]))]
    pre, h = block["preprocessing"], block["head"]
    head_sd, _ = _read(directory / "head.safetensors")
    if block["kind"] == "scratch":
        model = build_scratch(block["method"], len(names), dropout=h["dropout"], image_size=pre["image_size"])
        trunk, _ = _read(directory / "model.safetensors")
        model.backbone.load_state_dict(trunk, strict=True)
        model.head.load_state_dict(head_sd, strict=True)
        model = model.to(device=device, dtype=parse_dtype(dtype) or torch.float32)
    else:
        backbone = load_backbone(directory, dtype=weights_dtype, device=device)  # DINOv3 or DINOv2
        if conf.get("nanopeft_added_method"):  # VPT's prompts or AdaptFormer's branch, beside the backbone
            add_method_back(backbone, conf["nanopeft_added_method"], directory)
        kind = h.get("kind", "mlp")
        if kind == "knn":
            head = KNNProbe(head_sd["bank"], head_sd["labels"], len(names), k=h.get("k", 20), t=h.get("temperature", 0.07))
        else:
            head = LinearProbe(h["in_dim"], len(names)) if kind == "linear-probe" else \
                make_head(h["in_dim"], len(names), dropout=h["dropout"])
            try:
                head.load_state_dict(head_sd, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{directory / 'head.safetensors'} does not fit a {kind} head: "
                                 f"{str(e).splitlines()[-1].strip()}") from None
        model = Classifier(backbone, head.to(device), pool=pre["pooling"])
    model.class_names, model.preprocessing = names, pre
    model.train_priors = block.get("train_priors") or [1 / len(names)] * len(names)
    model.autocast_dtype, model.precision = amp, precision_name(amp)
    model.calibration = block.get("calibration") or {"kind": "none"}  # already in the head's weights
    model.task = block.get("task", "single")  # multilabel: sigmoid per class, each over its own threshold
    model.thresholds = block.get("thresholds")
    return model.eval()


# ----------------------------------------------------------------------------- the model card
def _card_header(conf: dict, block: dict, names: list[str]) -> list[str]:
    tags = ["image-classification", "nanopeft", block["method"]]
    lines = ["---", f"library_name: {'nanopeft' if block['kind'] == 'scratch' else 'transformers'}",
             "pipeline_tag: image-classification"]
    if block.get("base_model"):
        lines.append(f"base_model: {block['base_model']}")
    if block.get("quantize"):
        tags.append("4-bit")
    lines += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    return lines


def _usage(block: dict, name: str) -> list[str]:
    pre = block["preprocessing"]
    py = ["```python", "import nanopeft", f'model = nanopeft.load_classifier("{name}")   # backbone + head, eval mode',
          "logits = model(pixel_values)   # (B, 3, S, S) preprocessed as below -> (B, C)",
          "label = model.class_names[logits.argmax(-1)[0]]", "```", "",
          "Or from the command line (any folder, CSV with a `path` column, or glob of images):", "",
          "```bash", f"python predict.py --model {name} --data images/ --out predictions.csv", "```", ""]
    if block["kind"] == "scratch":
        return py + ["This is a randomly initialised baseline trained from scratch: its weights are in nanopeft's own "
                     "format (`model.safetensors` = the trunk, `head.safetensors` = the head) and only "
                     "`nanopeft.load_classifier` reads them; transformers cannot.", ""]
    tf = ["With transformers (the backbone; the head is a small MLP on its pooled feature):", "", "```python",
          "import torch, transformers", "from safetensors.torch import load_file",
          f'backbone = transformers.{block.get("backbone_class", "DINOv3ViTModel")}.from_pretrained("{name}").eval()'
          + ("   # needs: pip install bitsandbytes accelerate" if block.get("quantize") else ""),
          "head = torch.nn.Sequential(torch.nn.Linear(D, 1024), torch.nn.ReLU(), torch.nn.Dropout(),",
          "                           torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Dropout(),",
          f"                           torch.nn.Linear(512, {block['head']['num_classes']}))"
          f"   # D = {block['head']['in_dim']}",
          f'head.load_state_dict(load_file("{name}/head.safetensors")); head.eval()',
          "h = backbone(pixel_values=pixel_values).last_hidden_state   # (B, 1 + registers + patches, hidden)",
          f"# pooling `{pre['pooling']}`: cls = h[:, 0]; mean = patch tokens (after the registers) averaged; "
          "cls+mean = both concatenated",
          "logits = head(h[:, 0].float())", "```", ""]
    return py + tf


def test_results(run: Path, adapter_id: str | None) -> list[str]:
    """The card's test line: the run's metrics.json, only when eval.py scored this very adapter (its
    `adapter_id`), with the precision it computed in."""
    test = run / "metrics.json"
    try:
        m = json.loads(test.read_text()) if test.is_file() else None
    except (OSError, ValueError):
        m = None
    if not isinstance(m, dict) or "accuracy" not in m:
        return ["- test: not evaluated (`python eval.py --run RUN --data TEST_DIR`, then export again)"]
    if m.get("adapter_id") != adapter_id:
        return [f"- test: {test} scored another adapter than the one exported (evaluate it again, then export)"]
    return [f"- test ({m.get('data', 'test set')}, {m.get('num_samples', '?')} images, {m.get('precision', 'fp32')}): "
            f"accuracy {m['accuracy']:.4f}, macro F1 {m.get('macro_f1', float('nan')):.4f}"
            + (f", balanced accuracy {m['balanced_accuracy']:.4f}" if "balanced_accuracy" in m else "")]


def model_card(run: Path, cfg, saved: dict, conf: dict, name: str) -> str:
    """README.md of an export: what it classifies, how it was trained, how well, and how to load it."""
    block, names = conf["nanopeft"], saved["class_names"]
    pre = block["preprocessing"]
    val = _val_accuracy(run)
    lines = _card_header(conf, block, names)
    family = "DINOv2" if block.get("backbone_class", "").startswith("Dinov2") else "DINOv3"
    lines += [f"# {name}", "", f"A {len(names)}-class image classifier trained with nanopeft "
              f"(`--method {cfg.method}`" + (f", rank {cfg.rank}, targets {cfg.targets}" if cfg.method in ("lora", "dora")
                                            else "") + ")" + (f" on `{block['base_model']}`." if block.get("base_model")
                                                              else ", trained from scratch."), ""]
    if block["kind"] == "dinov3" and block["head"].get("kind") in ("linear-probe", "knn"):
        lines += [f"A frozen {family} (`model.safetensors`, the hub's format) and a {block['head']['kind']} on its "
                  f"pooled feature (`head.safetensors`" + (": the training images' unit feature vectors and labels, "
                  f"k = {block['head'].get('k')}, T = {block['head'].get('temperature')}" if block['head']['kind'] == "knn"
                                                          else ": one Linear") + ").", ""]
    elif block["kind"] == "dinov3":
        lines += [f"The adapters are merged into the backbone: `model.safetensors` is a plain {family} ViT in the hub's "
                  "format" + (", its block Linears in NF4 (bitsandbytes' 4-bit serialisation)" if block.get("quantize")
                              else f", {conf.get('dtype')}") + ". The head is in `head.safetensors` (fp32)."
                  + (f" The {conf['nanopeft_added_method']['method']} tensors, which do not merge into the weights, are in "
                     f"`method.safetensors`: `nanopeft.load_classifier` adds them back; transformers alone loads the "
                     f"backbone without them." if conf.get("nanopeft_added_method") else ""), ""]
    lines += ["## Classes", "", "| id | label |", "|---|---|", *[f"| {i} | {n} |" for i, n in enumerate(names)], ""]
    lines += ["## Results", ""]
    lines.append(f"- validation accuracy (best epoch): {val:.4f}" if val is not None else "- validation accuracy: not recorded")
    lines += test_results(run, block.get("adapter_id"))
    lines += ["", "## Inference precision", "", "`nanopeft.load_classifier` and `predict.py --model` compute as `eval.py` "
              "does by default: fp32 on every CPU, bf16 autocast on a GPU with bf16 (`precision=` / `--precision` "
              "choose another), so an image gets the same label from each.", "",
              *([f"Calibration: `{block['calibration']['kind']}` fitted on the run's validation logits "
                 f"({block['calibration'].get('why', '')}), folded into the head's last Linear: the logits are the "
                 f"calibrated ones.", ""] if block.get("calibration", {}).get("kind", "none") != "none" else []),
              "## Preprocessing", "",
              f"RGB, resized to {pre['image_size']} × {pre['image_size']} px ({pre['resize']}), pixels / 255, then (x - mean) / std with mean "
              f"{pre['mean']} and std {pre['std']}. Pooling: `{pre['pooling']}`.", "", "## How to load", ""]
    lines += _usage(block, name)
    lines += ["## Training configuration", "", "```json", json.dumps(saved["train"], indent=2), "```", ""]
    return "\n".join(lines)
