"""The performance levers a run chooses from its config: precision (nanopeft/device.py), which blocks
recompute in backward (nanopeft/backbones/dinov3.py, nanopeft/training/build.py plan_checkpointing) and the adapters'
dropout mode and sampler (TrainConfig -> build.py -> add_adapters)."""

import pytest
import torch

import nanopeft.device as device_mod
import nanopeft.backbones.dinov3 as model_mod
from nanopeft.training.build import build_classifier, memory_estimate, plan_checkpointing
from nanopeft.config import PRESETS, TrainConfig
from nanopeft.device import choose_precision, cpu_has_native_bf16, fast_cpu_bf16, inference_precision
from nanopeft.backbones.dinov3 import DINOv3ViT

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, fast", [("fpu avx2 avx512f avx512_bf16 amx_tile", True),
                                         ("fpu avx2 amx_bf16", True), ("fpu sse avx2 fma", False)])
def test_fast_cpu_bf16_reads_the_cpu_flags(tmp_path, flags, fast):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(info)) is fast
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # Graviton3 / Neoverse V1
    assert cpu_has_native_bf16(str(arm)) is True
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False  # no /proc (macOS): fp32


def test_the_probe_override_is_read_at_call_time(monkeypatch):
    """$NANOPEFT_CPU_BF16 forces either branch, also where the function was imported by name (as here)."""
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda *a: True)  # what the probe would say
    monkeypatch.delenv("NANOPEFT_CPU_BF16")
    assert fast_cpu_bf16() is True
    for value, want in (("0", False), ("1", True), ("0", False)):
        monkeypatch.setenv("NANOPEFT_CPU_BF16", value)
        assert fast_cpu_bf16() is want and device_mod.fast_cpu_bf16() is want
    monkeypatch.setenv("NANOPEFT_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="NANOPEFT_CPU_BF16"):
        fast_cpu_bf16()


def test_precision_auto_on_cpu_follows_the_hardware(monkeypatch):
    monkeypatch.setenv("NANOPEFT_CPU_BF16", "1")
    dtype, why = choose_precision(CPU, "auto")
    assert dtype == torch.bfloat16 and "AVX512-BF16" in why
    monkeypatch.setenv("NANOPEFT_CPU_BF16", "0")
    dtype, why = choose_precision(CPU, "auto")
    assert dtype is None and "fp32" in why and "emulated" in why
    assert choose_precision(CPU, "bf16")[0] == torch.bfloat16 and choose_precision(CPU, "fp32")[0] is None
    assert choose_precision(CPU, "fp16") == (torch.float16, "fp16 (--precision fp16)")


@pytest.mark.parametrize("native", ["0", "1"])
def test_inference_auto_is_fp32_on_every_cpu_and_bf16_by_flag(monkeypatch, native):
    monkeypatch.setenv("NANOPEFT_CPU_BF16", native)
    dtype, line = inference_precision(CPU, "auto")
    assert dtype is None and "fp32" in line and "same answer" in line
    assert inference_precision(CPU, "bf16")[0] == torch.bfloat16
    assert choose_precision(CPU, "auto")[0] == (torch.bfloat16 if native == "1" else None)  # training follows the CPU


def test_precision_auto_on_gpus(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    dtype, why = choose_precision(gpu, "auto")
    assert dtype == torch.float16 and "GradScaler" in why and "V100" in why
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision(gpu, "auto")[0] == torch.bfloat16


def test_old_config_json_booleans_read_as_all_or_none_and_bad_values_name_the_flag():
    assert TrainConfig(grad_checkpointing=True).resolved().grad_checkpointing == "all"
    assert TrainConfig(grad_checkpointing=False).resolved().grad_checkpointing == "none"
    c = TrainConfig().resolved()
    assert (c.grad_checkpointing, c.dora_dropout, c.dropout_sampler, c.memory_budget) == ("all", "peft", "bits", 0.0)
    for field, value, flag in [("grad_checkpointing", "some", "--grad-checkpointing"),
                               ("dora_dropout", "both", "--dora-dropout"),
                               ("dropout_sampler", "numpy", "--dropout-sampler"),
                               ("memory_budget", -1.0, "--memory-budget")]:
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**{field: value}).resolved()


def test_checkpointing_a_subset_recomputes_exactly_those_blocks_with_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = DINOv3ViT(PRESETS["tiny"].replace(num_hidden_layers=3)).train()
    model.set_rope_augmentation(None, None, None)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = model_mod.checkpoint

    def counting(block, *args, **kw):
        calls.append(next(i for i, b in enumerate(model.layer) if b is block))
        return real(block, *args, **kw)

    monkeypatch.setattr(model_mod, "checkpoint", counting)
    grads = {}
    for blocks, want in [(False, []), (True, [0, 1, 2]), (2, [0, 1]), ({2}, [2]), (0, [])]:
        calls.clear()
        model.zero_grad()
        model.set_gradient_checkpointing(blocks)
        model(x).square().mean().backward()
        assert calls == want, blocks
        grads[str(blocks)] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads["False"]) > 20  # every block's weights got a gradient
    for g in grads.values():
        torch.testing.assert_close(g, grads["False"])
    with torch.no_grad():  # no recomputation outside training
        calls.clear()
        model(x)
        assert calls == []
    for bad in (4, {3}, -1):
        with pytest.raises(ValueError, match="gradient_checkpointing"):
            model.set_gradient_checkpointing(bad)


def vitb(**kw):
    cfg = TrainConfig(weights="w/dinov3-vitb16", method="lora", rank=16, **kw).resolved()
    return cfg, build_classifier(cfg, 9, CPU, meta=True)


def test_auto_checkpoints_the_fewest_blocks_that_fit_the_budget():
    cfg, model = vitb(grad_checkpointing="auto", batch_size=4)
    L = model.backbone.config.num_hidden_layers
    every, none = (memory_estimate(model, cfg, CPU, None, checkpointed_blocks=k).total for k in (L, 0))
    budget = (every + none) / 2
    line = plan_checkpointing(model, cfg, CPU, None, budget_gb=budget)
    k = model.backbone.gradient_checkpointing
    assert 0 < k < L and f"{k} of {L} blocks (auto" in line
    assert memory_estimate(model, cfg, CPU, None, checkpointed_blocks=k).total <= budget
    assert memory_estimate(model, cfg, CPU, None, checkpointed_blocks=k - 1).total > budget
    line = plan_checkpointing(model, cfg, CPU, None, budget_gb=0.1)
    assert model.backbone.gradient_checkpointing == L and "do not fit" in line
    cfg, model = vitb(grad_checkpointing="auto", memory_budget=1e6)
    assert "--memory-budget" in plan_checkpointing(model, cfg, CPU, None) and model.backbone.gradient_checkpointing == 0
    for choice, want in (("all", L), ("none", 0)):
        cfg, model = vitb(grad_checkpointing=choice)
        assert f"{want} of {L} blocks (--grad-checkpointing {choice})" in plan_checkpointing(model, cfg, CPU, None)
        assert model.backbone.gradient_checkpointing == want
    cfg = TrainConfig(method="resnet18", grad_checkpointing="auto").resolved()
    assert "not used" in plan_checkpointing(build_classifier(cfg, 9, CPU, meta=True), cfg, CPU, None)


def test_the_config_reaches_the_adapters():
    from nanopeft.methods.inject import adapter_layers
    from nanopeft.methods.dropout import BitsDropout

    for mode, sampler, kind in [("lora", "torch", torch.nn.Dropout), ("peft", "bits", BitsDropout)]:
        cfg = TrainConfig(weights="w/dinov3-vits16", method="dora", rank=4, targets="q_proj", dora_dropout=mode,
                          dropout_sampler=sampler).resolved()
        layers = adapter_layers(build_classifier(cfg, 9, CPU, meta=True))
        assert layers and all(w.dora_dropout == mode and type(w.lora_dropout) is kind for _, w in layers)


def test_memory_budget_is_most_of_the_free_memory_plus_what_the_process_holds():
    gb, source = device_mod.memory_budget_gb(CPU)
    with open("/proc/meminfo") as f:
        total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:")) / 1e9
    assert 0 < gb <= 0.9 * total + 1e-6 and "RAM" in source


def test_eval_and_predict_say_which_inference_path(monkeypatch):
    from nanopeft.device import inference_precision

    monkeypatch.setenv("NANOPEFT_CPU_BF16", "1")
    dtype, line = inference_precision(CPU, "bf16", "yes")
    assert dtype == torch.bfloat16 and "bf16" in line and "merged into dense Linears" in line
    assert "NF4" in inference_precision(CPU, "fp32", "requantize")[1]
    assert "unmerged" in inference_precision(CPU, "fp32", "no")[1]
    assert inference_precision(CPU, "fp32", None) == (None, "inference: fp32 (--precision fp32)")


def test_grad_checkpointing_flag_keeps_its_old_switch_forms():
    import train

    def chosen(*argv):
        return train.run_config(train.parse_args(list(argv))).grad_checkpointing

    assert chosen("--grad-checkpointing") == "all"       # the old switch
    assert chosen("--no-grad-checkpointing") == "none"   # the old switch's negation
    assert chosen("--grad-checkpointing", "auto") == "auto"
    assert chosen() == "all"


@pytest.mark.parametrize("env, on", [(None, True), ("0", False), ("1", True)])
def test_hugepage_cpu_allocator_is_on_in_a_fresh_process_unless_the_user_said_no(env, on):
    """train.py's first call: in a process that has no tensor yet it turns on torch's page-aligned CPU
    allocator (a 2 MiB tensor's address becomes a multiple of 4096); a value the user set wins."""
    import os
    import subprocess
    import sys

    code = ("import os; from nanopeft.device import hugepage_cpu_allocator; "
            "print(hugepage_cpu_allocator(), os.environ['THP_MEM_ALLOC_ENABLE'])")
    e = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | ({} if env is None else
                                                                                 {"THP_MEM_ALLOC_ENABLE": env})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, check=True).stdout
    assert out.split() == [str(on), env or "1"]
