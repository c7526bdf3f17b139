"""nanopeft/files/checkpoint.py: load what transformers writes (and Meta's .pth), refuse what does not fit."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanopeft import load_dinov3
from nanopeft.files.checkpoint import CheckpointError
from nanopeft.files.checkpoint_format import atomic_write

X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # non-square: 4 × 6 patches


def hf_lib():
    """transformers, the oracle: tests that need it skip one by one when it is missing."""
    return pytest.importorskip("transformers")


def reference(folder, dtype=torch.float32):
    hf = hf_lib().DINOv3ViTModel.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return hf(pixel_values=X.to(dtype)).last_hidden_state


def run(model):
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_parity_with_transformers(tiny_ckpt, gated, sharded):
    folder, _ = tiny_ckpt(gated=gated, sharded=sharded)
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
    model = load_dinov3(folder)
    assert not model.training
    assert (run(model) - reference(folder)).abs().max() <= 1e-5


def test_bf16_on_disk(tiny_ckpt):
    folder, _ = tiny_ckpt(dtype=torch.bfloat16, sharded=True)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_dinov3(folder)  # default: the checkpoint's dtype
    assert model.norm.weight.dtype == torch.bfloat16
    fp32 = load_dinov3(folder, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert (run(fp32) - reference(folder, torch.float32)).abs().max() <= 1e-5


def test_torch_dtype_key_and_model_prefix(tiny_ckpt, tmp_path):
    folder, _ = tiny_ckpt()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")  # transformers 4.x wrote torch_dtype
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(folder / "model.safetensors")
    save_file({"model." + k: v for k, v in sd.items()}, tmp_path / "model.safetensors")
    assert (run(load_dinov3(tmp_path)) - reference(folder)).abs().max() <= 1e-5


def test_config_pos_embed_switch(tiny_ckpt, tmp_path):
    folder, _ = tiny_ckpt()
    assert load_dinov3(folder).config.pos_embed_rescale == 2.0  # the hub default
    shutil.copy(folder / "model.safetensors", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pos_embed_rescale"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_dinov3(tmp_path).train()
    assert model.rope_embeddings.rescale is None
    assert torch.equal(run(model), run(model.eval()))


def to_meta_layout(sd: dict, gated: bool) -> dict:
    """The inverse of docs/DINOV3.md ("Checkpoint keys (Meta .pth)"): a hub state dict in Meta's original key layout."""
    out = {"cls_token": sd["embeddings.cls_token"], "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"][0],  # Meta stores (1, D)
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
           "rope_embed.periods": torch.ones(4).bfloat16(),
           "local_cls_norm.weight": torch.ones(64), "local_cls_norm.bias": torch.zeros(64)}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layer."))
    for i in range(n_layers):
        L, B = f"layer.{i}.", f"blocks.{i}."
        out[B + "attn.qkv.weight"] = torch.cat([sd[L + f"attention.{p}_proj.weight"] for p in "qkv"])
        if L + "attention.q_proj.bias" in sd:
            zeros = torch.zeros_like(sd[L + "attention.q_proj.bias"])
            out[B + "attn.qkv.bias"] = torch.cat([sd[L + "attention.q_proj.bias"], zeros,
                                                  sd[L + "attention.v_proj.bias"]])
            out[B + "attn.qkv.bias_mask"] = torch.cat([torch.ones_like(zeros), zeros, torch.ones_like(zeros)])
        for name in ("weight", "bias"):
            out[B + f"attn.proj.{name}"] = sd[L + f"attention.o_proj.{name}"]
            out[B + f"norm1.{name}"] = sd[L + f"norm1.{name}"]
            out[B + f"norm2.{name}"] = sd[L + f"norm2.{name}"]
            mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if gated else \
                {"fc1": "up_proj", "fc2": "down_proj"}
            for m, h in mlp.items():
                out[B + f"mlp.{m}.{name}"] = sd[L + f"mlp.{h}.{name}"]
        out[B + "ls1.gamma"] = sd[L + "layer_scale1.lambda1"]
        out[B + "ls2.gamma"] = sd[L + "layer_scale2.lambda1"]
    return out


@pytest.mark.parametrize("gated", [True, False])
def test_meta_pth(tiny_ckpt, tmp_path, gated):
    folder, hf = tiny_ckpt(gated=gated)
    sd = load_file(folder / "model.safetensors")
    torch.save(to_meta_layout(sd, gated), tmp_path / "dinov3_tiny.pth")
    cfg = json.loads((folder / "config.json").read_text())
    model = load_dinov3(tmp_path / "dinov3_tiny.pth", config=cfg)  # config as a config.json dict
    assert (run(model) - reference(folder)).abs().max() <= 1e-5


def test_meta_pth_needs_a_config(tiny_ckpt, tmp_path):
    folder, _ = tiny_ckpt()
    torch.save(to_meta_layout(load_file(folder / "model.safetensors"), True), tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="preset"):
        load_dinov3(tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="missing key.*40-layer D=4096"):  # 7B preset vs tiny weights
        load_dinov3(tmp_path / "weights.pth", config="vit7b16")
    with pytest.raises(ValueError, match="unknown DINOv3 preset"):
        load_dinov3(tmp_path / "weights.pth", config="vit9b")


def copy_ckpt(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_missing_unexpected_and_misshapen_keys(tiny_ckpt, tmp_path):
    folder, _ = tiny_ckpt()
    sd = load_file(folder / "model.safetensors")
    for name, edit, match in [
        ("missing", lambda d: d.pop("layer.1.mlp.up_proj.weight"), "missing key.*layer.1.mlp.up_proj.weight"),
        ("unexpected", lambda d: d.__setitem__("layer.0.extra", torch.zeros(3)), "unexpected key.*layer.0.extra"),
        ("shape", lambda d: d.__setitem__("norm.bias", torch.zeros(65)), "norm.bias.*shape"),
    ]:
        out = copy_ckpt(folder, tmp_path / name)
        bad = dict(sd)
        edit(bad)
        save_file(bad, out / "model.safetensors")
        with pytest.raises(CheckpointError, match=match) as err:
            load_dinov3(out)
        assert str(out) in str(err.value)


def test_truncated_and_corrupt_files(tiny_ckpt, tmp_path):
    folder, _ = tiny_ckpt()
    out = copy_ckpt(folder, tmp_path / "trunc")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_dinov3(out)
    (out / "model.safetensors").write_bytes(data[:100])  # cut inside the JSON header
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors"):
        load_dinov3(out)
    (out / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_dinov3(out)


def test_missing_shard_and_bad_index(tiny_ckpt, tmp_path):
    folder, _ = tiny_ckpt(sharded=True)
    out = copy_ckpt(folder, tmp_path / "shards")
    shard = sorted(out.glob("model-*.safetensors"))[3]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_dinov3(out)
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json"):
        load_dinov3(out)


def test_missing_paths_and_configs(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_dinov3(tmp_path / "nowhere")
    folder, _ = tiny_ckpt()
    out = copy_ckpt(folder, tmp_path / "noconfig")
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dinov3(out)
    cfg = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    with pytest.raises(CheckpointError, match="model_type"):
        load_dinov3(out)
    (out / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    with pytest.raises(CheckpointError, match="config.json"):
        load_dinov3(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_dinov3(empty)
    with pytest.raises(ValueError, match="quantize"):
        load_dinov3(folder, quantize="int8")


@pytest.mark.parametrize("direct", [True, False])
def test_stream_reads_every_tensor(tiny_ckpt, monkeypatch, direct):
    import threading

    from nanopeft.files import checkpoint

    monkeypatch.setattr(checkpoint, "DIRECT_IO", direct)  # O_DIRECT (the default on Linux) or the page cache
    folder, _ = tiny_ckpt(dtype=torch.bfloat16, sharded=True)
    want = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        want |= load_file(f)
    source, _, _ = checkpoint.open_checkpoint(folder)
    got, storages = {}, set()
    for key, t in source.stream():
        got[key] = t.clone()  # a borrowed tensor is valid until the next one
        storages.add(t.untyped_storage().data_ptr())
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert len(storages) == 3  # everything passed through the same three buffers
    before = threading.active_count()
    for i, _ in enumerate(source.stream()):  # stopping early ends the reader thread
        if i == 2:
            break
    assert threading.active_count() == before


@pytest.mark.skipif(not hasattr(__import__("os"), "O_DIRECT"), reason="no O_DIRECT on this OS")
def test_direct_reads_fall_back_where_refused(tiny_ckpt, monkeypatch):
    """A filesystem without O_DIRECT (tmpfs refuses the open, some refuse the read) reads buffered."""
    import errno
    import fcntl
    import os

    folder, _ = tiny_ckpt()
    real_readv, refused = os.readv, []

    def readv(fd, bufs):  # EINVAL on direct descriptors, as such a filesystem does
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_readv(fd, bufs)

    monkeypatch.setattr(os, "readv", readv)
    assert (run(load_dinov3(folder)) - reference(folder)).abs().max() <= 1e-5
    assert refused  # the direct read was tried, refused, and the load still matches


def test_load_to_dtype_and_device_and_no_mmap_views(tiny_ckpt):
    folder, _ = tiny_ckpt()
    model = load_dinov3(folder, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_embeddings.inv_freq.dtype == torch.float32  # RoPE table stays fp32
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ quantize on load (NF4)
def test_quantize_on_load_equals_dequantized_reference(tiny_ckpt):
    from nanopeft.nf4 import quantize_nf4
    from nanopeft.nf4_linear import NF4Linear

    folder, _ = tiny_ckpt(sharded=True)
    q = load_dinov3(folder, quantize="nf4")
    nf4 = {n for n, m in q.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 14 and all(n.startswith("layer.") for n in nf4)  # 7 per block, nothing outside
    assert isinstance(q.embeddings.patch_embeddings, torch.nn.Conv2d)
    assert all(not p.requires_grad for n, p in q.named_parameters() if n.rpartition(".")[0] in nf4)
    ref = load_dinov3(folder)
    with torch.no_grad():
        for n in nf4:  # the reference: each Linear's weight replaced by its NF4 round trip
            lin = ref.get_submodule(n)
            lin.weight.copy_(quantize_nf4(lin.weight).dequantize())
    assert torch.equal(run(q), run(ref))


def test_quantize_on_load_dtype_is_compute_dtype(tiny_ckpt):
    folder, _ = tiny_ckpt(dtype=torch.bfloat16)
    q = load_dinov3(folder, quantize="nf4", dtype=torch.float32)
    layer = q.layer[0].mlp.up_proj
    assert layer.compute_dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert q.norm.weight.dtype == torch.float32
    assert run(q).dtype == torch.float32


def test_prequantized_transformers_bnb_checkpoint(tiny_ckpt, tmp_path):
    pytest.importorskip("bitsandbytes")
    folder, _ = tiny_ckpt()
    cfg = hf_lib().BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = hf_lib().DINOv3ViTModel.from_pretrained(folder, quantization_config=cfg, device_map="cpu")
    hf.train()  # bnb repacks its CPU weights in eval mode (docs/NF4.md "bitsandbytes CPU traps"): compare layer by layer
    hf.save_pretrained(tmp_path)
    assert "quantization_config" in json.loads((tmp_path / "config.json").read_text())
    ours = load_dinov3(tmp_path)  # NF4 read as stored: no re-quantization
    assert type(ours.layer[0].attention.q_proj).__name__ == "NF4Linear"
    requant = load_dinov3(folder, quantize="nf4")
    assert torch.equal(run(ours), run(requant))  # bnb's bytes == ours, so the same model
    for name, module in hf.named_modules():
        if type(module).__name__ == "Linear4bit":
            x = torch.randn(3, module.in_features)
            with torch.no_grad():
                torch.testing.assert_close(ours.get_submodule(name.removeprefix("model."))(x), module(x))


def test_prequantized_with_missing_state_is_refused(tiny_ckpt, tmp_path):
    pytest.importorskip("bitsandbytes")
    folder, _ = tiny_ckpt()
    cfg = hf_lib().BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = hf_lib().DINOv3ViTModel.from_pretrained(folder, quantization_config=cfg, device_map="cpu").train()
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["layer.1.mlp.up_proj.weight.absmax"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="layer.1.mlp.up_proj"):
        load_dinov3(tmp_path)


def test_nan_weight_is_named(tiny_ckpt, tmp_path):
    folder, _ = tiny_ckpt()
    out = copy_ckpt(folder, tmp_path / "nan")
    sd = load_file(folder / "model.safetensors")
    sd["layer.1.attention.k_proj.weight"][3, 5] = float("nan")
    save_file(sd, out / "model.safetensors")
    with pytest.raises(ValueError, match="layer.1.attention.k_proj.weight"):
        load_dinov3(out, quantize="nf4")


# ------------------------------------------------------------------ damaged files (docs/RELIABILITY.md)
TARGET = "layer.0.mlp.up_proj.weight"  # (128, 64) float32: the tensor the damage is aimed at


def split_st(path):
    """A safetensors file -> (header dict, the bytes after it)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path, header: bytes, body: bytes):
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)


def edit_header(path, fn):
    """Rewrite the header as text: fn(json text) -> new text (bytes allowed)."""
    header, body = split_st(path)
    text = fn(json.dumps(header))
    write_st(path, text if isinstance(text, bytes) else text.encode(), body)


def edit_entry(path, key, **fields):
    header, body = split_st(path)
    header[key].update(fields)
    write_st(path, json.dumps(header).encode(), body)


def cut(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def st_damage(folder, case):
    """Damage folder/model.safetensors as `case` says -> the strings the error must name besides the file."""
    f = folder / "model.safetensors"
    header, body = split_st(f)
    n = len(f.read_bytes()) - len(body) - 8
    begin, end = header[TARGET]["data_offsets"]
    actions = {
        "st-truncated-length": lambda: f.write_bytes(f.read_bytes()[:5]),
        "st-truncated-header": lambda: f.write_bytes(f.read_bytes()[: 8 + n // 2]),
        "st-truncated-data": lambda: f.write_bytes(f.read_bytes()[: 8 + n + (begin + end) // 2]),
        "st-trailing-bytes": lambda: f.write_bytes(f.read_bytes() + b"\0" * 7),
        "st-length-too-large": lambda: f.write_bytes((len(f.read_bytes()) * 2).to_bytes(8, "little")
                                                     + f.read_bytes()[8:]),
        "st-length-zero": lambda: f.write_bytes(bytes(8) + f.read_bytes()[8:]),
        "st-header-not-utf8": lambda: edit_header(f, lambda t: t.encode().replace(b"norm", b"n\xffrm", 1)),
        "st-header-not-json": lambda: edit_header(f, lambda t: t.replace(":", ";", 3)),
        "st-header-not-object": lambda: edit_header(f, lambda t: "[" + t + "]"),
        "st-header-deep-nesting": lambda: edit_header(f, lambda t: '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"),
        "st-header-nan": lambda: edit_header(f, lambda t: t.replace('"shape": [128, 64]', '"shape": [NaN, 64]', 1)),
        "st-duplicate-key": lambda: edit_header(f, lambda t: t.replace(
            f'"{TARGET}": ', f'"{TARGET}": {json.dumps(header[TARGET])}, "{TARGET}": ', 1)),
        "st-field-renamed": lambda: edit_header(f, lambda t: t.replace(
            f'"{TARGET}": {{"dtype": "F32", "shape"', f'"{TARGET}": {{"dtype": "F32", "shapx"', 1)),
        "st-dtype-changed": lambda: edit_entry(f, TARGET, dtype="F33"),
        "st-shape-digit": lambda: edit_entry(f, TARGET, shape=[129, 64]),
        "st-offsets-overlap": lambda: edit_entry(f, TARGET, data_offsets=[begin - 64, end - 64]),
        "st-offsets-out-of-range": lambda: edit_entry(f, TARGET, data_offsets=[len(body) + 8, len(body) + 8 + end - begin]),
        "st-metadata-invalid": lambda: write_st(f, json.dumps({**header, "__metadata__": {"format": 1}}).encode(), body),
        "st-key-renamed": lambda: write_st(f, json.dumps({("norm.biaz" if k == "norm.bias" else k): v
                                                           for k, v in header.items()}).encode(), body),
    }
    actions[case]()
    return {"st-truncated-data": [TARGET], "st-duplicate-key": [TARGET], "st-field-renamed": [TARGET],
            "st-dtype-changed": [TARGET, "F33"], "st-shape-digit": [TARGET], "st-offsets-overlap": [TARGET],
            "st-offsets-out-of-range": [TARGET], "st-key-renamed": ["norm.bias"],
            "st-header-not-utf8": ["byte"]}.get(case, [])


def index_damage(folder, case):
    """Damage a sharded checkpoint's index (or a shard) -> (file the error names, other strings)."""
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    wm = doc["weight_map"]
    key, shard = next(iter(wm.items()))
    other = next(v for v in wm.values() if v != shard)
    if case == "index-missing-shard":
        (folder / shard).unlink()
        return index, [shard, key]
    if case == "index-not-json":
        index.write_text("{not json")
    elif case == "index-duplicate-key":
        index.write_text(json.dumps(doc).replace(f'"{key}": ', f'"{key}": "{shard}", "{key}": ', 1))
    elif case == "index-no-weight-map":
        index.write_text(json.dumps({"metadata": {}}))
    elif case == "index-path-outside":  # a valid shard waits outside: following the path would load
        shutil.copy(folder / shard, folder.parent / shard)
        index.write_text(json.dumps({"weight_map": {k: "../" + v if v == shard else v for k, v in wm.items()}}))
    elif case == "index-wrong-shard":
        index.write_text(json.dumps({"weight_map": {**wm, key: other}}))
        return folder / shard, [key, other]
    elif case == "index-unlisted-key":
        index.write_text(json.dumps({"weight_map": {k: v for k, v in wm.items() if k != key}}))
        return folder / shard, [key]
    return index, [key] if case in ("index-duplicate-key", "index-path-outside") else []


class CallsMkdir:
    """A pickle payload: unpickling it calls os.mkdir(marker). weights_only=True must never let it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.mkdir, (self.marker,)


def pth_damage(folder, case, tmp_path):
    """A Meta-style .pth (or a broken config.json) -> (path to load, file the error names, strings)."""
    sd = load_file(folder / "model.safetensors")
    pth = tmp_path / "weights.pth"
    if case == "pth-crafted-pickle":
        torch.save({"cls_token": CallsMkdir(tmp_path / "pwned")}, pth)
    elif case == "pth-truncated":
        torch.save(sd, pth)
        cut(pth, 0.5)
    elif case == "pth-not-a-state-dict":
        torch.save({**sd, "epoch": 3}, pth)
        return pth, pth, ["'epoch'"]
    else:
        text = (folder / "config.json").read_text()
        (folder / "config.json").write_text(text[:-5] if case == "config-not-json"
                                            else '{"hidden_size": 32, ' + text[1:])
        return folder, folder / "config.json", ["hidden_size"] if case == "config-duplicate-key" else []
    return pth, pth, []


def test_damaged_checkpoint(own_tiny_ckpt, tmp_path, reliability_case):
    """Each damage a checkpoint can suffer ends in one CheckpointError naming the file (and the tensor or
    key at fault): never a KeyError, a crash or half a model."""
    from nanopeft.files.checkpoint import SafetensorsSource

    case = reliability_case["id"]
    folder = copy_ckpt(own_tiny_ckpt(sharded=case.startswith("index")), tmp_path / "ckpt")
    config = None
    if case.startswith("index"):
        path = folder
        named, strings = index_damage(folder, case)
    elif case.startswith(("pth", "config")):
        path, named, strings = pth_damage(folder, case, tmp_path)
        config = "tiny" if path.suffix == ".pth" else None
    elif case in ("st-nan-values", "st-inf-values"):
        sd = load_file(folder / "model.safetensors")
        sd[TARGET][3, 5] = float("nan") if case == "st-nan-values" else float("inf")
        save_file(sd, folder / "model.safetensors")
        for fast in (True, False):
            with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{TARGET}' holds 1 NaN/inf"):
                list(SafetensorsSource([folder / "model.safetensors"], fast=fast).stream())
        path, named, strings = folder, folder / "model.safetensors", [TARGET]
        with pytest.raises(ValueError, match=TARGET):
            load_dinov3(folder, quantize="nf4")
    elif case == "st-shape-invalid":
        f = folder / "model.safetensors"
        for bad in ([-1, 64], [128.0, 64], [True, 64]):
            edit_entry(f, TARGET, shape=bad)
            with pytest.raises(CheckpointError, match=f"{f}: tensor '{TARGET}' has an invalid shape"):
                load_dinov3(folder)
        path, named, strings = folder, f, [TARGET]
    else:
        strings = st_damage(folder, case)
        path, named = folder, (folder if case == "st-key-renamed" else folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_dinov3(path, config=config)
    message = str(err.value)
    assert str(named) in message and all(s in message for s in strings), message
    assert "\n" not in message
    if case == "index-missing-shard":
        assert isinstance(err.value, FileNotFoundError)
    if case == "pth-crafted-pickle":
        assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_readers_agree(own_tiny_ckpt, tmp_path, reliability_case):
    """The plain safe_open reader and the fast O_DIRECT reader yield the same tensors, on shards and on a
    file whose odd offsets force the fast reader's aligned copies; both equal safetensors' load_file."""
    from nanopeft.files.checkpoint import SafetensorsSource

    g = torch.Generator().manual_seed(0)
    odd = {"a": torch.randn(3, generator=g).bfloat16(), "b": torch.randn(5, 2, generator=g),
           "c": torch.arange(7, dtype=torch.int64), "d": torch.tensor([True, False, True]),
           "e": torch.zeros(0, 3, dtype=torch.float16), "model.f": torch.randn(9, generator=g).half(),
           "g": torch.randint(-128, 127, (11,), dtype=torch.int8, generator=g)}
    save_file(odd, tmp_path / "odd.safetensors")
    sharded = own_tiny_ckpt(sharded=True)
    for files in ([tmp_path / "odd.safetensors"], sorted(sharded.glob("model-*.safetensors"))):
        want = {k.removeprefix("model."): v for f in files for k, v in load_file(f).items()}
        simple = {k: t.clone() for k, t in SafetensorsSource(files, fast=False).stream()}
        fast = {k: t.clone() for k, t in SafetensorsSource(files).stream()}
        assert list(simple) == list(fast) and set(simple) == set(want)
        for k in want:
            assert simple[k].dtype == fast[k].dtype == want[k].dtype and simple[k].shape == want[k].shape
            assert torch.equal(simple[k], fast[k]) and torch.equal(fast[k], want[k])
    assert SafetensorsSource(files).fast  # the loader's default is the fast reader


def test_atomic_write_syncs_data_before_the_rename(tmp_path, monkeypatch, reliability_case):
    """The new bytes are fsynced before the rename and the folder after it; a failing write leaves the old
    file and no temporary behind."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "metrics.json"
    target.write_text("old")
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new"
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert ".metrics.json.tmp-" in events[0][1] and events[2][1] == str(tmp_path)

    def fails(p):
        p.write_text("half")
        raise OSError("No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, fails)
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
