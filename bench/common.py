"""What bench/step.py, bench/infer.py, bench/memory_7b.py and bench/gpu.py share: a random DINOv3
checkpoint in the hub format, the two stacks built from it, and process-level measurements.

    nanopeft   load_dinov3(folder, quantize="nf4") ─► add_adapters ─► Classifier(backbone, head)
    reference  transformers DINOv3ViTModel.from_pretrained(folder, BitsAndBytesConfig(nf4, double
               quant)) ─► peft.get_peft_model(LoraConfig(use_dora=...)) ─► the same head on pooler_output

Both sides read the same file, train the same adapters (r, α, dropout, targets) and the same head
(nanopeft.head.make_head: a plain nn.Sequential), with the same loss and AdamW.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = Path(os.environ.get("NANOPEFT_BENCH_CACHE", Path.home() / ".cache" / "nanopeft"))
NUM_CLASSES = 9  # the study's behaviour classes
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def preset_config(preset: str) -> dict:
    """The hub config.json of a nanopeft preset ("tiny": a 2-block model for smoke runs)."""
    from nanopeft import PRESETS

    if preset == "tiny":
        return {**PRESETS["vits16"].to_dict(), **TINY}
    return PRESETS[preset].to_dict()


def synthetic_checkpoint(preset: str, folder: Path | None = None) -> Path:
    """A random checkpoint of `preset`'s shape in the hub format (fp32 safetensors + config.json),
    written once by nanopeft's own model (hub key names) and cached. Values do not change the cost."""
    from safetensors.torch import save_file

    from nanopeft import DINOv3ViT, ViTConfig

    folder = folder or CACHE / f"bench-{preset}"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = preset_config(preset)
    torch.manual_seed(0)
    model = DINOv3ViT(ViTConfig.from_dict(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02)
            if name.endswith("lambda1"):
                p.fill_(0.1)
            elif "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(folder / "model.safetensors")
    return folder


def build_nanopeft(folder: Path, method: str, rank: int, alpha: float, dropout: float, targets: str,
                   dtype: torch.dtype, checkpointing: bool, dora_dropout: str = "peft",
                   dropout_sampler: str = "torch", adapters: bool = True) -> nn.Module:
    from nanopeft import Classifier, add_adapters, load_dinov3, make_head

    backbone = load_dinov3(folder, quantize=None if method == "full" else "nf4", dtype=dtype)  # full: dense
    backbone.requires_grad_(False)
    backbone.gradient_checkpointing = checkpointing
    if adapters:
        add_adapters(backbone, method=method, rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                     dora_dropout=dora_dropout, dropout_sampler=dropout_sampler)
    torch.manual_seed(1)
    return Classifier(backbone, make_head(backbone.config.hidden_size, NUM_CLASSES), pool="cls")


class ReferenceClassifier(nn.Module):
    """transformers' backbone (PEFT-wrapped) + the same head on its pooler_output (the CLS token)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.classifier = backbone, head

    def forward(self, pixel_values):
        return self.classifier(self.backbone(pixel_values=pixel_values).pooler_output.float())


def build_reference(folder: Path, method: str, rank: int, alpha: float, dropout: float, targets: str,
                    dtype: torch.dtype, checkpointing: bool, adapters: bool = True) -> nn.Module:
    import transformers
    from peft import LoraConfig, get_peft_model

    from nanopeft import make_head

    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    bb = transformers.DINOv3ViTModel.from_pretrained(folder, quantization_config=q, dtype=dtype,
                                                     device_map="cpu" if not torch.cuda.is_available() else "cuda")
    if checkpointing:
        bb.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapters:
        tm = "all-linear" if targets == "all-linear" else [targets]
        bb = get_peft_model(bb, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=tm,
                                           use_dora=method == "dora"))
    torch.manual_seed(1)
    return ReferenceClassifier(bb, make_head(bb.config.hidden_size, NUM_CLASSES))


def peak_rss_gb() -> float:
    """The process's high-water mark (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def rss_gb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so a later vmhwm_gb() is the peak since."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vmhwm_gb() -> float:
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024 / 1e9


def run_child(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Run `script --child ...` in a fresh process; its last stdout line is a JSON row."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                       env=env, timeout=timeout)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        return {"error": " | ".join(tail)}
    return json.loads(p.stdout.strip().splitlines()[-1])


def timed(fn, n: int, cpu: list | None = None) -> list[float]:
    """Wall seconds of n calls of fn; with `cpu` given, also appends each call's process CPU seconds
    (on a shared machine, what the call itself computed: other processes only inflate the wall time)."""
    out = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return out
