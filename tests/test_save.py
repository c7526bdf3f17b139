"""nanopeft/files/save.py: PEFT-format adapter files, loadable both ways (ours -> PEFT, PEFT -> ours)."""

import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from conftest import PIXELS, make_bnb_config as bnb_config, make_peft_model as peft_model  # bridge: test_save owner moves to the fixtures

import nanopeft.files.save as save_mod
from nanopeft.files.load import load_dinov3
from nanopeft.methods.inject import adapter_layers, add_adapters
from nanopeft.files.save import load_adapter, save_adapter

R, ALPHA = 4, 8
REQUIRED = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "bias",
            "fan_in_fan_out", "modules_to_save", "init_lora_weights", "task_type")


def trained(ckpt, method, targets, nf4=False, rslora=False, seed=0):
    """Our tiny DINOv3 with adapters that are not at their init (B != 0, m != ‖W0‖)."""
    model = load_dinov3(ckpt, quantize="nf4" if nf4 else None)
    add_adapters(model, method=method, rank=R, alpha=ALPHA, targets=targets, use_rslora=rslora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, w in adapter_layers(model):
            w.lora_B.weight.normal_(0, 0.05)
            if method == "dora":
                w.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(w.lora_magnitude_vector))
    return model.eval()


def peft_from_pretrained(ckpt, adapter_dir, nf4=False, head=None):
    """PeftModel.from_pretrained as README.md shows it: a saved head needs a `classifier` module of its
    layout on the backbone first (PEFT >= 0.22 warns about the head's keys otherwise)."""
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")  # skip this test only
    kw = dict(quantization_config=bnb_config(), device_map="cpu") if nf4 else {}
    hf = transformers.DINOv3ViTModel.from_pretrained(ckpt, **kw)
    if head is not None:
        hf.classifier = head
    for m in hf.modules():  # docs/NF4.md ("bitsandbytes CPU traps")
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, adapter_dir)
    problems = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not problems, problems  # PEFT found every adapter tensor where it expected it
    return pm.eval()


@pytest.mark.parametrize("head", [False, True], ids=["adapter", "with-head"])
@pytest.mark.parametrize("targets", ["q_proj", "all-linear"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_ours_load_in_peft(tiny_ckpt, tmp_path, method, targets, head):
    ckpt, _ = tiny_ckpt(gated=True)
    ours = trained(ckpt, method, targets, rslora=head)
    clf = nn.Linear(64, 3) if head else None
    save_adapter(ours, tmp_path, head=clf, base_model_name_or_path=str(ckpt))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(k in cfg for k in REQUIRED) and cfg["use_dora"] is (method == "dora") and cfg["use_rslora"] is head
    assert cfg["modules_to_save"] == (["classifier"] if head else None) and cfg["r"] == R
    sd = load_file(tmp_path / "adapter_model.safetensors")
    n = 2 if targets == "q_proj" else 14
    assert len(sd) == n * (3 if method == "dora" else 2) + 2 * head
    assert "base_model.model.model.layer.1.attention.q_proj.lora_A.weight" in sd
    if method == "dora":
        assert sd["base_model.model.model.layer.0.attention.q_proj.lora_magnitude_vector"].shape == (64,)
    if head:
        assert torch.equal(sd["base_model.model.classifier.weight"], clf.weight)
    pm = peft_from_pretrained(ckpt, tmp_path, head=nn.Linear(64, 3) if head else None)
    with torch.no_grad():
        ref, out = pm(pixel_values=PIXELS).last_hidden_state, ours(PIXELS)
    assert (out - ref).abs().max() <= 1e-5
    if head:  # PEFT filled the attached head with the saved one
        loaded = pm.base_model.model.classifier.modules_to_save["default"]
        assert torch.equal(loaded.weight, clf.weight) and torch.equal(loaded.bias, clf.bias)


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
@pytest.mark.parametrize("method,targets", [("lora", ["q_proj", "v_proj"]), ("dora", "all-linear")])
def test_peft_files_load_in_ours(tiny_ckpt, tmp_path, method, targets, layout):
    ckpt, _ = tiny_ckpt(gated=True)
    pm = peft_model(ckpt, method, targets).eval()
    pm.save_pretrained(tmp_path)
    if layout == "transformers4":  # the same adapter as PEFT on transformers 4 writes it
        sd = load_file(tmp_path / "adapter_model.safetensors")
        save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in sd.items()},
                  tmp_path / "adapter_model.safetensors")
    ours = load_dinov3(ckpt).eval()
    assert load_adapter(ours, tmp_path) == {}
    assert len(adapter_layers(ours)) == (4 if method == "lora" else 14)
    assert not any(p.requires_grad for p in ours.parameters())  # trainable=False: ready for eval
    with torch.no_grad():
        ref, out = pm(pixel_values=PIXELS).last_hidden_state, ours(PIXELS)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_nf4_both_ways(tiny_ckpt, tmp_path, method):
    ckpt, _ = tiny_ckpt(gated=True)
    ours = trained(ckpt, method, "all-linear", nf4=True)
    save_adapter(ours, tmp_path / "ours")
    pm = peft_from_pretrained(ckpt, tmp_path / "ours", nf4=True)
    with torch.no_grad():
        assert (ours(PIXELS) - pm(pixel_values=PIXELS).last_hidden_state).abs().max() <= 1e-5
    pm2 = peft_model(ckpt, method, "all-linear", nf4=True).eval()
    pm2.save_pretrained(tmp_path / "peft")
    back = load_dinov3(ckpt, quantize="nf4").eval()
    load_adapter(back, tmp_path / "peft", trainable=True)
    assert all(p.requires_grad == ("lora_" in n) for n, p in back.named_parameters())
    with torch.no_grad():
        assert (back(PIXELS) - pm2(pixel_values=PIXELS).last_hidden_state).abs().max() <= 1e-5


def test_head_and_extra_state_round_trip(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt(gated=True)
    ours = trained(ckpt, "dora", "q_proj")
    head = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    tied = torch.randn(5, 2)
    extra = {"scratch.fc.weight": tied, "scratch.out.weight": tied, "scratch.row": tied[1], "step": torch.tensor(17)}
    save_adapter(ours, tmp_path, head=head, extra_state=extra)
    back, head2 = load_dinov3(ckpt).eval(), nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    got = load_adapter(back, tmp_path, head=head2)
    assert sorted(got) == sorted(extra) and all(torch.equal(got[k], v) for k, v in extra.items())
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), head2.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(back(PIXELS), ours(PIXELS))
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(load_dinov3(ckpt), tmp_path, head=nn.Linear(64, 4))
    # a head-only directory (frozen backbone) and a no-head directory asked for a head
    frozen = load_dinov3(ckpt)
    save_adapter(frozen, tmp_path / "frozen", head=head)
    h3 = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    load_adapter(load_dinov3(ckpt), tmp_path / "frozen", head=h3)
    assert torch.equal(h3[2].bias, head[2].bias)
    save_adapter(ours, tmp_path / "nohead")
    with pytest.raises(ValueError, match="holds no head"):
        load_adapter(load_dinov3(ckpt), tmp_path / "nohead", head=h3)


def _edit(directory, fn):
    path = directory / "adapter_model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_refuses_what_peft_would_silently_ignore(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt(gated=True)
    save_adapter(trained(ckpt, "lora", "q_proj"), tmp_path / "a")
    key = "base_model.model.model.layer.0.attention.q_proj.lora_A.weight"
    cases = [("bogus", lambda sd: sd.__setitem__("base_model.model.model.layer.0.attention.k_proj.lora_A.weight",
                                                 torch.zeros(R, 64)), "match no adapter.*k_proj"),
             ("missing", lambda sd: sd.pop(key), "missing.*layer.0.attention.q_proj.lora_A"),
             ("shape", lambda sd: sd.__setitem__(key, torch.zeros(R, 32)), "shape.*q_proj.lora_A")]
    for name, fn, msg in cases:
        d = tmp_path / name
        save_adapter(trained(ckpt, "lora", "q_proj"), d)
        _edit(d, fn)
        with pytest.raises(ValueError, match=msg):
            load_adapter(load_dinov3(ckpt), d)
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    (tmp_path / "a/adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(ValueError, match="bias"):
        load_adapter(load_dinov3(ckpt), tmp_path / "a")
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(cfg))
    other = load_dinov3(ckpt)
    add_adapters(other, method="dora", rank=R, alpha=ALPHA, targets="q_proj")
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(load_dinov3(ckpt), tmp_path / "nowhere")


def test_writes_atomically_and_never_over_a_different_adapter(tiny_ckpt, tmp_path, monkeypatch):
    ckpt, _ = tiny_ckpt(gated=True)
    lora = trained(ckpt, "lora", "q_proj")
    save_adapter(lora, tmp_path)
    first = load_file(tmp_path / "adapter_model.safetensors")
    with torch.no_grad():
        lora.layer[0].attention.q_proj.lora_B.weight.add_(1.0)
    save_adapter(lora, tmp_path)  # the same adapter, newer weights (a run's next checkpoint): fine
    assert not torch.equal(load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.model.layer.0.attention.q_proj.lora_B.weight"],
        first["base_model.model.model.layer.0.attention.q_proj.lora_B.weight"])
    with pytest.raises(FileExistsError, match="r, lora_alpha|use_dora"):
        save_adapter(trained(ckpt, "dora", "q_proj"), tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(save_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(lora, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before  # the old file survives whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.undo()
    save_adapter(trained(ckpt, "dora", "q_proj"), tmp_path, overwrite=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


# ------------------------------------------------------------------ damaged and crafted files (docs/RELIABILITY.md)
class CallsMkdir:
    """A pickle payload: unpickling it calls os.mkdir(marker). No adapter loading path may unpickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.mkdir, (self.marker,)


Q = "base_model.model.model.layer.0.attention.q_proj."


def damage_adapter(case, d, marker):
    """Damage the adapter directory d as `case` says -> (file the error names, strings it must hold)."""
    import pickle

    w, c = d / "adapter_model.safetensors", d / "adapter_config.json"
    edits = {"ad-unexpected-key": (lambda sd: sd.__setitem__(Q.replace("q_proj", "k_proj") + "lora_A.weight",
                                                            torch.zeros(R, 64)), "k_proj.lora_A"),
             "ad-missing-key": (lambda sd: sd.pop(Q + "lora_B.weight"), "layer.0.attention.q_proj.lora_B"),
             "ad-wrong-shape": (lambda sd: sd.__setitem__(Q + "lora_A.weight", torch.zeros(R, 32)), "q_proj.lora_A"),
             "ad-wrong-dtype": (lambda sd: sd.__setitem__(Q + "lora_A.weight", torch.zeros(R, 64, dtype=torch.int64)),
                                "torch.int64"),
             "ad-head-wrong-dtype": (lambda sd: sd.__setitem__("base_model.model.classifier.weight",
                                                               torch.zeros(3, 64, dtype=torch.int64)), "weight"),
             "ad-nan": (lambda sd: sd[Q + "lora_B.weight"].__setitem__((0, 0), float("nan")), "q_proj.lora_B")}
    if case in edits:
        fn, key = edits[case]
        _edit(d, fn)
        return w, [key]
    if case == "ad-pickle-bin":
        w.unlink()
        (d / "adapter_model.bin").write_bytes(pickle.dumps({Q + "lora_A.weight": CallsMkdir(marker)}))
        return d / "adapter_model.bin", ["pickle"]
    if case == "ad-pickle-as-safetensors":
        w.write_bytes(pickle.dumps({Q + "lora_A.weight": CallsMkdir(marker)}))
        return w, []
    if case == "ad-truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return w, []
    text = c.read_text()
    if case == "ad-config-not-json":
        c.write_text(text[:-3])
        return c, []
    if case == "ad-config-duplicate-key":
        c.write_text('{"r": 64, ' + text.lstrip()[1:])
        return c, ["'r'"]
    raise KeyError(case)


def test_damaged_adapter(own_tiny_ckpt, tmp_path, reliability_case):
    """An adapter directory from elsewhere is refused with the file and key named, and no path unpickles."""
    from nanopeft.files.checkpoint import CheckpointError

    case, ckpt = reliability_case["id"], own_tiny_ckpt()
    model = load_dinov3(ckpt)
    add_adapters(model, method="lora", rank=R, alpha=ALPHA, targets="q_proj")
    head = nn.Linear(64, 3)
    save_adapter(model, tmp_path / "a", head=head if case == "ad-head-wrong-dtype" else None)
    if case == "ad-config-bad-field":
        cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        for field, value in [("r", "4"), ("lora_alpha", -1), ("target_modules", 3), ("use_dora", "yes")]:
            (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
            with pytest.raises(CheckpointError, match=f"adapter_config.json: invalid {field}="):
                load_adapter(load_dinov3(ckpt), tmp_path / "a")
        return
    named, strings = damage_adapter(case, tmp_path / "a", tmp_path / "pwned")
    with pytest.raises(CheckpointError) as err:
        load_adapter(load_dinov3(ckpt), tmp_path / "a", head=nn.Linear(64, 3) if case == "ad-head-wrong-dtype" else None)
    message = str(err.value)
    assert str(named) in message and all(s in message for s in strings) and "\n" not in message, message
    assert not (tmp_path / "pwned").exists()  # no payload ever ran


def test_no_pickle_path():
    """save.py has no way to unpickle: no torch.load, pickle or numpy allow_pickle anywhere in it."""
    import inspect
    source = inspect.getsource(save_mod)
    assert not any(word in source for word in ("torch.load", "import pickle", "allow_pickle", "weights_only=False"))
