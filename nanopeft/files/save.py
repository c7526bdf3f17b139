"""Adapter files in PEFT's format: one directory holds a whole fine-tuned classifier.

    <dir>/adapter_model.safetensors
        base_model.model.model.layer.3.attention.q_proj.lora_A.weight          (r, in)   fp32
        base_model.model.model.layer.3.attention.q_proj.lora_B.weight          (out, r)  fp32
        base_model.model.model.layer.3.attention.q_proj.lora_magnitude_vector  (out,)    fp32, DoRA only
        base_model.model.classifier.<param>     the head, if one is given (PEFT's modules_to_save naming)
        base_model.model.<name>                 extra tensors (`extra_state`), listed in the file's metadata
    <dir>/adapter_config.json                   PEFT's LoraConfig fields
    <dir>/README.md                             model card: YAML front matter (library_name: peft, base_model)

Key paths. PEFT prefixes `base_model.model.` to the module path inside the wrapped transformers model.
In transformers 5 the blocks of DINOv3ViTModel live at `model.layer.N`, so our `layer.N.attention.q_proj`
is written as `base_model.model.model.layer.N.attention.q_proj` (PEFT on transformers 5 silently drops
keys written as `base_model.model.layer.N...`, the transformers 4 layout). Loading accepts both layouts.
`target_modules` lists the adapted modules by their full names in our layout (`layer.N.attention.q_proj`):
PEFT matches list entries as suffixes at a `.` boundary, so they select the same modules under both layouts.

The head. A head (any nn.Module) is saved under `base_model.model.classifier.*` with
`modules_to_save: ["classifier"]` in the config, which is how PEFT itself stores a trained classification
head. `PeftModel.from_pretrained(DINOv3ViTModel.from_pretrained(...), dir)` finds no module named
`classifier` there and ignores both the entry and those keys, loading the backbone adapter cleanly
(checked in tests/test_save.py); with no head, `modules_to_save` is null. `task_type` is null: DINOv3ViTModel
takes `pixel_values`, which PEFT's task-specific wrappers would not pass through.

Unlike PEFT, `load_adapter` refuses what it cannot place: keys that match no adapter, wrong shapes or
dtypes, NaN/inf values, and adapter tensors missing from the file, each error naming the key. Adapter files
are untrusted downloads: they are read only from safetensors (header validated by checkpoint_format.py first) and
JSON; a pickled `adapter_model.bin` is never opened, so a crafted file cannot run code. Files are written atomically (temp
file + os.replace). An existing adapter of a different shape (method, r, alpha, targets, head) in the
directory is not overwritten unless overwrite=True; re-saving the same adapter (checkpoints of one run) is.
A directory with only a head or extra tensors (no adapters) is valid for load_adapter, not for PEFT.

The base model. `base_model_name_or_path` and the card's `base_model:` name the hub id of a released DINOv3
(`facebook/dinov3-vit7b16-pretrain-lvd1689m`, docs/DINOV3.md ("Released sizes")) when the backbone is one
(base_model_id), so the hub links the adapter to its base; any other backbone is named by its path. The
card follows PEFT's save_pretrained: front matter with `library_name: peft`, `base_model`, and tags
`base_model:adapter:<id>` and `lora`. A README.md that nanopeft did not write is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import guess_preset
from .checkpoint_format import (CheckpointError, atomic_write, check_finite, parse_json, read_json,
                                read_safetensors_header)
from ..config import PRESETS
from ..methods.dora import DoRALinear
from ..methods.inject import adapter_layers, add_adapters, method_of, method_settings, method_tensors

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
HEAD = "classifier"
EXTRA_META = "nanopeft_extra_state"  # safetensors metadata: JSON list of the extra tensors' names
ID_META = "nanopeft_adapter_id"       # safetensors metadata: the content hash of the tensors (adapter_identity)
EPOCH_META = "nanopeft_epoch"         # safetensors metadata: the training epoch the tensors are from, if given
# config fields that identify an adapter: a directory holding a different one is not silently overwritten
IDENTITY = ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "target_modules", "modules_to_save",
            "nanopeft_method", "prompts", "rank", "adapter_scale")
LN_TARGETS = ["norm1", "norm2", "norm"]  # PEFT's LNTuningConfig target_modules for DINOv3's LayerNorms
BACKBONE_NAME = "backbone/model.safetensors"  # --method full: the whole backbone in hub keys (+ config.json there)
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules",
               "fan_in_fan_out", "lora_bias", "bias")


def peft_path(name: str) -> str:
    """Our module path -> the one inside transformers 5's DINOv3ViTModel (blocks under `model.`)."""
    return "model." + name if name.startswith("layer.") else name


def from_peft_path(name: str) -> str:
    """The inverse of peft_path."""
    return name.removeprefix("model.") if name.startswith("model.layer.") else name


def _adapter_tensors(name: str, w: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"{name}.lora_A.weight": w.lora_A.weight, f"{name}.lora_B.weight": w.lora_B.weight}
    if isinstance(w, DoRALinear):
        out[f"{name}.lora_magnitude_vector"] = w.lora_magnitude_vector
    return out


def file_key(name: str, method: str | None) -> str:
    """A trained tensor's name in the backbone -> its key in adapter_model.safetensors after `base_model.model.`:
    PEFT's layout (LayerNorm tuning: PEFT's LN_TUNING copy of the norm, `<norm>.ln_tuning_layers.<weight|bias>`)."""
    if method == "layernorm":
        module, _, attr = name.rpartition(".")
        return f"{peft_path(module)}.ln_tuning_layers.{attr}"
    return peft_path(name)


def from_file_key(key: str, where="adapter_model.safetensors") -> str:
    """The inverse of file_key, for either PEFT layout (and DINOv2 adapters of older transformers)."""
    return renamed_dinov2(from_peft_path(key.replace(".ln_tuning_layers.", ".")), where)


def adapter_config(model: nn.Module, *, head: bool = False, base_model_name_or_path=None) -> dict:
    """The adapter_config.json of the model's method: PEFT's LoraConfig (LoRA, DoRA) or LNTuningConfig
    (LayerNorm tuning), else nanopeft's own (peft_type NANOPEFT, which PEFT refuses: docs/METHODS.md)."""
    method = method_of(model)
    common = {"task_type": None, "base_model_name_or_path": base_model_name_or_path, "revision": None,
              "inference_mode": True, "modules_to_save": [HEAD] if head else None}
    if method == "layernorm":
        final = "layernorm" if hasattr(model, "layernorm") else "norm"  # DINOv2's final norm / DINOv3's
        return {"peft_type": "LN_TUNING", **common, "target_modules": [*LN_TARGETS[:2], final], "exclude_modules": None}
    if method not in (None, "lora", "dora"):
        return {"peft_type": "NANOPEFT", "nanopeft_method": method, **common, **method_settings(model)}
    layers = adapter_layers(model)
    kinds = {(type(w).__name__, w.rank, w.alpha, w.use_rslora, getattr(w.lora_dropout, "p", 0.0)) for _, w in layers}
    if len(kinds) > 1:
        raise ValueError(f"the model's adapters differ in (type, r, alpha, rslora, dropout): {sorted(kinds)}; "
                         f"one adapter config per file is supported")
    kind, r, alpha, rslora, p = kinds.pop() if kinds else ("LoRALinear", 0, 0, False, 0.0)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": p, "use_rslora": rslora, "use_dora": kind == "DoRALinear",
        "target_modules": [n for n, _ in layers], "exclude_modules": None,
        "modules_to_save": [HEAD] if head else None,
        "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


HUB_ID = "facebook/dinov3-{}-pretrain-{}"  # lvd1689m for every size; ViT-L and 7B also sat493m
CARD_NAME, CARD_MARK = "README.md", "<!-- written by nanopeft: replaced on every save -->"
ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp",
               "patch_size", "num_register_tokens")


def base_model_id(weights) -> str:
    """The hub id of the released DINOv3 behind `weights`, else the path as given. The size comes from the
    folder's config.json (its architecture fields equal to a release's: docs/DINOV3.md ("Released
    sizes")) or, without one, from the name (a Meta .pth like dinov3_vit7b16_pretrain_lvd1689m-….pth);
    a config.json of no released size (a tiny test model, a custom ViT) keeps the path."""
    path = Path(str(weights))
    config = path / "config.json" if path.is_dir() else path.with_name("config.json")
    pths = sorted(path.glob("*.pth")) if path.is_dir() else []
    name = path.name if guess_preset(path.name) or len(pths) != 1 else pths[0].name  # a folder holding one .pth
    preset = guess_preset(name)
    if config.is_file():
        try:
            arch = json.loads(config.read_text())
            if arch.get("model_type") in ("dinov2", "dinov2_with_registers"):
                return dinov2_hub_id(arch) or str(weights)
            preset = next((n for n, p in PRESETS.items() if n != "tiny"
                           and all(arch.get(f) == getattr(p, f) for f in ARCH_FIELDS)), None)
        except (OSError, ValueError, AttributeError):
            preset = None
    if preset is None:
        return str(weights)
    data = "sat493m" if "sat493m" in name.lower() and preset in ("vitl16", "vit7b16") else "lvd1689m"
    return HUB_ID.format(preset, data)


def dinov2_hub_id(arch: dict) -> str | None:
    """facebook/dinov2-{small,base,large,giant}[-with-registers] when config.json's width and depth are a
    release's (nanopeft/backbones/dinov2.py PRESETS), else None."""
    from ..backbones.dinov2 import PRESETS as DINOV2_PRESETS

    registers = arch.get("model_type") == "dinov2_with_registers"
    for name, p in DINOV2_PRESETS.items():
        if ("with-registers" in name) == registers and (arch.get("hidden_size"), arch.get("num_hidden_layers")) == \
                (p.hidden_size, p.num_hidden_layers):
            return f"facebook/{name}"
    return None


# transformers ≤ 5.17 named DINOv2's Linears differently; an adapter written then is mapped on load
OLD_DINOV2_NAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
                    "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
                    "mlp.weights_out": "mlp.down_proj"}


def renamed_dinov2(name: str, where) -> str:
    """An older transformers' DINOv2 module path -> today's; the SwiGLU's fused `weights_in` is refused."""
    if "mlp.weights_in" in name:
        raise CheckpointError(f"{where}: {name!r} adapts the giant's fused gate+up projection (transformers ≤ 5.17), "
                              f"which is two Linears now: retrain the adapter, or adapt attention only")
    for old, new in OLD_DINOV2_NAMES.items():
        name = name.replace(old, new)
    return name


def model_card(config: dict, body: str = "", library_name: str = "peft") -> str:
    """README.md for an adapter folder: PEFT's front matter (library_name, base_model, tags), then body."""
    base = config.get("base_model_name_or_path")
    tags = sorted({"lora", *(["dora"] if config.get("use_dora") else []), "nanopeft", "image-classification",
                   *([f"base_model:adapter:{base}"] if base else [])})
    front = ["---", *([f"base_model: {base}"] if base else []), f"library_name: {library_name}",
             "pipeline_tag: image-classification", "tags:", *[f"- {t}" for t in tags], "---", CARD_MARK, ""]
    if not body:
        body = (f"# {'DoRA' if config.get('use_dora') else 'LoRA'} adapter\n\nRank {config.get('r')}, alpha "
                f"{config.get('lora_alpha')}, on {base or 'a DINOv3 backbone'}; written by nanopeft.\n")
    return "\n".join(front) + "\n" + body


def tensors_id(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes; 128-bit BLAKE2b, hex): equal files
    get equal ids. Computed once when a file is written and stored in its metadata, so nothing re-hashes a
    multi-GB file to tell which adapter it is."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_identity(directory) -> tuple[str, int | None]:
    """(id, epoch) of the adapter file in `directory`, from its metadata alone (header read, no tensor)."""
    return file_identity(Path(directory) / WEIGHTS_NAME)


def file_identity(w_path) -> tuple[str, int | None]:
    """(id, epoch) of a weights file nanopeft wrote (adapter, probe), from its metadata alone. A file written
    before ids existed gets one from its header, size and modification time."""
    w_path = Path(w_path)
    header = read_safetensors_header(w_path)
    epoch = header.metadata.get(EPOCH_META)
    epoch = int(epoch) if epoch is not None and epoch.isdigit() else None
    if header.metadata.get(ID_META):
        return header.metadata[ID_META], epoch
    st = w_path.stat()
    legacy = json.dumps([sorted(header.tensors.items()), st.st_size, st.st_mtime_ns], default=str)
    return "legacy-" + hashlib.blake2b(legacy.encode(), digest_size=8).hexdigest(), epoch


def save_adapter(model: nn.Module, directory, *, head: nn.Module | None = None, extra_state=None,
                 base_model_name_or_path: str | None = None, overwrite: bool = False, card: str | None = None,
                 library_name: str = "peft", epoch: int | None = None) -> Path:
    """Write the model's adapters (+ an optional head and extra tensors) in PEFT's format; returns the dir.

    model: the backbone holding the adapters (DINOv3ViT after add_adapters), not a backbone+head wrapper.
    head: any nn.Module, stored as `base_model.model.classifier.<its state_dict key>`.
    extra_state: {name: tensor}, stored as `base_model.model.<name>` (e.g. a scratch baseline's weights).
    card: write README.md, this text below PEFT's front matter (model_card; "" = a short default body);
    library_name: the front matter's (scratch networks are no PEFT adapter: "pytorch").
    epoch: the training epoch the weights are from, kept in the file's metadata (adapter_identity).
    The file's metadata also holds its content hash (tensors_id), the adapter's identity.
    """
    directory = Path(directory)
    config = adapter_config(model, head=head is not None, base_model_name_or_path=base_model_name_or_path)
    method, tensors, backbone = method_of(model), {}, {}
    for name, t in method_tensors(model).items():
        if method == "full":  # the whole backbone: its own file, in hub keys (load_dinov3 reads the folder)
            backbone[name] = t
        else:
            tensors[PREFIX + file_key(name, method)] = t
    for key, t in (head.state_dict() if head is not None else {}).items():
        tensors[f"{PREFIX}{HEAD}.{key}"] = t
    extra = dict(extra_state or {})
    for key, t in extra.items():
        if not isinstance(t, torch.Tensor) or PREFIX + key in tensors:
            raise ValueError(f"extra_state[{key!r}] must be a tensor whose name differs from the adapter "
                             f"and head keys")
        tensors[PREFIX + key] = t
    if not tensors and not backbone:
        raise ValueError("save_adapter: the model has no adapters and no head or extra_state was given")
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise ValueError(f"save_adapter: {meta[:3]} are on the meta device (call init_dora_magnitudes "
                         f"after loading the base weights)")
    for group in (tensors, backbone):
        seen = set()
        for k, t in group.items():
            t = group[k] = t.detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
                t = group[k] = t.clone()
            seen.add(t.untyped_storage().data_ptr())

    directory.mkdir(parents=True, exist_ok=True)
    old = directory / CONFIG_NAME
    if not overwrite and old.exists():
        prev = read_json(old)
        diff = [k for k in IDENTITY if prev.get(k) != config.get(k)]
        if diff:
            raise FileExistsError(f"{old} holds a different adapter ({', '.join(diff)} differ); "
                                  f"pass overwrite=True or another directory")
    elif not overwrite and (directory / WEIGHTS_NAME).exists():
        raise FileExistsError(f"{directory / WEIGHTS_NAME} exists without an {CONFIG_NAME}; "
                              f"pass overwrite=True or another directory")
    metadata = {"format": "pt", EXTRA_META: json.dumps(sorted(extra)), ID_META: tensors_id({**tensors, **backbone}),
                **({EPOCH_META: str(int(epoch))} if epoch is not None else {})}
    if backbone:  # written first: the adapter file (its id covers both) names a complete pair
        (directory / BACKBONE_NAME).parent.mkdir(exist_ok=True)
        atomic_write(directory / BACKBONE_NAME, lambda p: save_file(backbone, str(p), metadata={"format": "pt"}))
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    atomic_write(old, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    readme = directory / CARD_NAME
    if card is not None and (not readme.exists() or CARD_MARK in readme.read_text(errors="replace")):
        text = model_card(config, card, library_name)  # never over a README.md someone else wrote
        atomic_write(readme, lambda p: p.write_text(text))
    return directory


def _our_targets(model: nn.Module, targets):
    """PEFT's target_modules -> add_adapters targets. A string other than "all-linear" is a regex PEFT
    full-matches against module names in its own layout; a list holds suffixes (maybe full names in
    transformers 5's layout, `model.layer.N...`, which are `layer.N...` here)."""
    if targets == "all-linear":
        return targets
    if isinstance(targets, str):
        names = [n for n, _ in model.named_modules()
                 if n and (re.fullmatch(targets, n) or re.fullmatch(targets, peft_path(n)))]
        if not names:
            raise ValueError(f"target_modules regex {targets!r} matches no module of the model")
        return names
    return [renamed_dinov2(from_peft_path(t), "target_modules") for t in targets]


def _check_config(cfg: dict, cfg_path: Path) -> None:
    """The fields load_adapter uses, type-checked so a damaged config fails here, naming the field."""
    kind = cfg.get("peft_type", "LORA")
    if kind not in ("LORA", "LN_TUNING", "NANOPEFT"):
        raise CheckpointError(f"{cfg_path}: peft_type {kind!r} is not supported (LORA, LN_TUNING, NANOPEFT)")
    if kind == "NANOPEFT" and cfg.get("nanopeft_method") not in ("bitfit", "ssf", "vpt", "adaptformer", "full"):
        raise CheckpointError(f"{cfg_path}: unknown nanopeft_method {cfg.get('nanopeft_method')!r}")
    if kind != "LORA":
        return
    for field in UNSUPPORTED:  # PEFT features we do not implement: refuse rather than load something else
        if cfg.get(field) not in (None, False, "none", {}, []):
            raise CheckpointError(f"{cfg_path}: {field}={cfg[field]!r} is not supported by nanopeft")

    def names(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    least = 1 if cfg.get("target_modules") else 0  # a head-only directory stores r = alpha = 0
    checks = {"r": lambda v: type(v) is int and v >= least,
              "lora_alpha": lambda v: type(v) in (int, float) and v >= least,
              "lora_dropout": lambda v: v is None or (type(v) in (int, float) and 0 <= v < 1),
              "use_dora": lambda v: v is None or isinstance(v, bool),
              "use_rslora": lambda v: v is None or isinstance(v, bool),
              "target_modules": lambda v: v is None or isinstance(v, str) or names(v),
              "modules_to_save": lambda v: v is None or names(v)}
    for field, ok in checks.items():
        if (field in cfg or field in ("r", "lora_alpha")) and not ok(cfg.get(field)):
            raise CheckpointError(f"{cfg_path}: invalid {field}={cfg.get(field)!r}")


def _read(directory: Path) -> tuple[dict, dict, set]:
    """adapter_config.json, the tensors, and the names of the extra tensors; refuses unsupported configs.
    Only safetensors + JSON: a pickle (PEFT's old adapter_model.bin) is never unpickled."""
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not w_path.is_file() and (directory / "adapter_model.bin").is_file():
        raise CheckpointError(f"{directory / 'adapter_model.bin'} is a pickle, which nanopeft never loads "
                              f"(it can run code); save the adapter as {WEIGHTS_NAME}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: not an adapter directory")
    cfg = read_json(cfg_path)
    _check_config(cfg, cfg_path)
    header = read_safetensors_header(w_path)  # damaged files fail here, before safetensors sees them
    extra_names = parse_json(header.metadata.get(EXTRA_META, "[]").encode(), f"{w_path} metadata {EXTRA_META}")
    if not isinstance(extra_names, list) or not all(isinstance(n, str) for n in extra_names):
        raise CheckpointError(f"{w_path}: metadata {EXTRA_META} must be a JSON list of tensor names")
    with safe_open(w_path, "pt") as f:
        tensors = {k: check_finite(f.get_tensor(k), k, w_path) for k in header.tensors}
    return cfg, tensors, set(extra_names)


def _sort_keys(tensors: dict, expected: dict, heads: tuple, extra_names: set, w_path: Path):
    """The file's keys -> (adapter tensors by our name, head state dict, extra tensors); refuses keys
    that fit nowhere, missing adapter tensors, and wrong shapes or dtypes, naming the key."""
    head_sd, extra, found, unknown = {}, {}, {}, []
    for key, t in tensors.items():
        rest = key.removeprefix(PREFIX) if key.startswith(PREFIX) else None
        if rest is None:
            unknown.append(key)
        elif rest in extra_names:
            extra[rest] = t
        elif heads and rest.startswith(heads):
            head_sd[rest.partition(".")[2]] = t
        elif from_file_key(rest) in expected:  # either layout: `layer.N...` or `model.layer.N...`
            found[from_file_key(rest)] = t
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{w_path}: {len(unknown)} key(s) match no adapter of the model: {unknown[:4]}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{w_path}: {len(missing)} adapter tensor(s) missing: {missing[:4]}")
    bad = [f"{k}: file {tuple(t.shape)} vs model {tuple(expected[k].shape)}" for k, t in found.items()
           if t.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{w_path}: shape mismatch: {bad[:4]}")
    bad = [f"{k}: {t.dtype}" for k, t in found.items() if not t.is_floating_point()]
    if bad:
        raise CheckpointError(f"{w_path}: adapter tensors must be floating point, got {bad[:4]}")
    return found, head_sd, extra


def _lora_into(model: nn.Module, cfg: dict, directory: Path) -> dict:
    """A LoraConfig's adapters into the model (injected if it has none; else they must be the file's kind);
    returns the tensors the file must hold, by our name."""
    use_dora = bool(cfg.get("use_dora"))
    layers = adapter_layers(model)
    if not layers and cfg.get("target_modules"):
        add_adapters(model, method="dora" if use_dora else "lora", rank=cfg["r"], alpha=cfg["lora_alpha"],
                     dropout=cfg.get("lora_dropout") or 0.0, targets=_our_targets(model, cfg["target_modules"]),
                     use_rslora=bool(cfg.get("use_rslora")))
        layers = adapter_layers(model)
    want = (use_dora, cfg.get("r"), cfg.get("lora_alpha"), bool(cfg.get("use_rslora")))
    for name, w in layers:  # adapters already in the model must be the file's kind
        have = (isinstance(w, DoRALinear), w.rank, w.alpha, w.use_rslora)
        if have != want:
            raise CheckpointError(f"{name}: the model's adapter (dora, r, alpha, rslora) = {have} does not match "
                                  f"{directory / CONFIG_NAME}'s {want}")
    return {k: t for name, w in layers for k, t in _adapter_tensors(name, w).items()}


def _read_backbone(directory: Path) -> dict:
    """--method full's backbone file (safetensors only, header validated, values finite)."""
    path = directory / BACKBONE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a full fine-tuning adapter keeps its backbone there")
    header = read_safetensors_header(path)
    with safe_open(path, "pt") as f:
        return {k: check_finite(f.get_tensor(k), k, path) for k in header.tensors}


def load_adapter(model: nn.Module, directory, trainable: bool = False, head: nn.Module | None = None) -> dict:
    """Load a PEFT-format adapter into `model` in place (injecting it first if the model has none).

    Both key layouts load: transformers 5 (`base_model.model.model.layer.N...`) and 4
    (`base_model.model.layer.N...`). trainable=False freezes the loaded adapters (evaluation);
    True leaves them trainable (resume training). head: a module to load the saved head into.
    Returns the extra tensors saved with extra_state, {name: tensor} (empty if none).
    """
    directory = Path(directory)
    w_path = directory / WEIGHTS_NAME
    cfg, tensors, extra_names = _read(directory)
    if cfg.get("peft_type", "LORA") == "LORA":
        expected = _lora_into(model, cfg, directory)
    else:  # LayerNorm tuning (PEFT's LN_TUNING) or one of nanopeft's (NANOPEFT): docs/METHODS.md
        method = "layernorm" if cfg["peft_type"] == "LN_TUNING" else cfg["nanopeft_method"]
        if method_of(model) is None:
            add_adapters(model, method=method, rank=cfg.get("rank"), dropout=cfg.get("dropout") or 0.0,
                         prompts=cfg.get("prompts", 10), adapter_scale=cfg.get("adapter_scale", 0.1))
        elif method_of(model) != method:
            raise CheckpointError(f"{directory / CONFIG_NAME} holds a {method} adapter; the model has "
                                  f"{method_of(model)}")
        expected = method_tensors(model)
        if method == "full":  # the backbone's own file, in hub keys
            tensors = {**tensors, **{PREFIX + peft_path(k): t for k, t in _read_backbone(directory).items()}}
    heads = tuple(f"{h}." for h in (cfg.get("modules_to_save") or []))
    found, head_sd, extra = _sort_keys(tensors, expected, heads, extra_names, w_path)

    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, t in found.items():
            owner_name, _, attr = key.rpartition(".")  # `<path>.lora_A` + `weight`, `<path>` + `lora_magnitude_vector`
            owner = modules[owner_name]
            p = getattr(owner, attr)
            if p.is_meta:  # a model built on meta: the file's tensor becomes the parameter
                setattr(owner, attr, nn.Parameter(t.to(p.dtype)))
            else:
                p.copy_(t)
    for t in method_tensors(model).values():
        t.requires_grad_(trainable)

    if head is not None:
        if not head_sd:
            raise CheckpointError(f"{w_path} holds no head (no {PREFIX}{HEAD}.* keys), but head= was given")
        want = head.state_dict()
        bad = [f"{k}: {t.dtype} vs {want[k].dtype}" for k, t in head_sd.items()
               if k in want and t.is_floating_point() != want[k].is_floating_point()]
        if bad:  # load_state_dict would cast an integer tensor into a float weight without a word
            raise CheckpointError(f"{w_path}: head tensor dtypes do not fit the head: {bad[:4]}")
        try:
            head.load_state_dict(head_sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{w_path}: the saved head does not fit the given head module: {e}") from e
    return extra
