"""nanopeft/config.py: TrainConfig.resolved() checks and types the config once; to_dict() is the file form."""

import dataclasses
import json

import pytest

from nanopeft.config import (ADAPTER_METHODS, DINO_METHODS, METHODS, PAPER_RUNS, ROPE_FROM_CONFIG,
                             SCRATCH_METHODS, TrainConfig, joined_negative_values)


def test_resolved_types_targets_and_rope_once():
    c = TrainConfig(targets="q_proj, v_proj", rope_rescale="none", rope_shift="0.5", rope_jitter="config",
                    rank=8).resolved()
    assert c.targets == ["q_proj", "v_proj"]
    assert (c.rope_rescale, c.rope_shift, c.rope_jitter) == (None, 0.5, ROPE_FROM_CONFIG)
    assert (c.alpha, c.dropout) == (16.0, 0.1)  # 2·rank; 0.1 at rank <= 8
    assert TrainConfig(targets="q_proj").resolved().targets == "q_proj"
    assert TrainConfig(targets="all-linear").resolved().targets == "all-linear"
    assert TrainConfig(targets="v_proj").resolved().targets == ["v_proj"]
    assert TrainConfig(rope_rescale="off").resolved().rope_rescale is None
    assert TrainConfig(rope_rescale=2).resolved().rope_rescale == 2.0
    assert c.resolved() == c  # idempotent


@pytest.mark.parametrize("field,value,flag", [("targets", " , ", "--targets"), ("rope_shift", "lots", "--rope-shift"),
                                              ("method", "qlora", "--method"), ("pool", "max", "--pool"),
                                              ("rank", 0, "--rank")])
def test_bad_values_name_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**{field: value}).resolved()


def test_to_dict_is_the_command_line_form_and_reads_back():
    """config.json stores the text a user typed: an old run's file (strings) and a new one are the same,
    and both resolve to the same config."""
    old = dataclasses.asdict(TrainConfig(targets="q_proj,v_proj", rope_rescale="none", rope_shift="0.5"))
    c = TrainConfig(**old).resolved()
    d = c.to_dict()
    assert (d["targets"], d["rope_rescale"], d["rope_shift"], d["rope_jitter"]) == ("q_proj,v_proj", "none", "0.5",
                                                                                    "config")
    assert json.loads(json.dumps(d)) == d
    assert TrainConfig(**d).resolved() == c
    default = TrainConfig().resolved().to_dict()
    assert {k: v for k, v in default.items() if k not in ("alpha", "dropout")} == \
        {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in ("alpha", "dropout")}


def test_method_names_are_defined_once():
    assert METHODS == ("lora", "dora", "bitfit", "layernorm", "ssf", "vpt", "adaptformer", "full", "frozen",
                       "linear-probe", "knn", "resnet18", "vit-small")
    assert set(ADAPTER_METHODS) < set(DINO_METHODS) and not set(DINO_METHODS) & set(SCRATCH_METHODS)
    study = {"bitfit", "layernorm", "ssf", "vpt", "adaptformer", "full", "linear-probe", "knn"}  # not the paper's rows
    assert {row["method"] for row in PAPER_RUNS.values()} == set(METHODS) - study


@pytest.mark.parametrize("field,value", [("alpha", 0.0), ("alpha", -2.0), ("dropout", 1.0), ("dropout", -0.1),
                                         ("lr", 0.0), ("lr", float("nan")), ("lr", float("inf")),
                                         ("head_dropout", 1.0), ("label_smoothing", 1.0), ("warmup_ratio", 1.5),
                                         ("weight_decay", -0.01), ("patience", 0), ("max_steps", -1),
                                         ("ckpt_every", -1), ("workers", -1), ("val_fraction", 0.0)])
def test_out_of_range_values_name_the_flag(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be in"):
        TrainConfig(**{field: value}).resolved()


def test_negative_values_reach_the_range_check(capsys):
    """`--lr -1e-4` ends in check_ranges' message, not argparse's "expected one argument" (Python < 3.13
    takes -1e-4 for an option); every other token is left as it was."""
    import train

    assert joined_negative_values(["--lr", "-1e-4", "--weight-decay", "-.5", "--out", "x", "--dry-run", "-3"]) == \
        ["--lr=-1e-4", "--weight-decay=-.5", "--out", "x", "--dry-run=-3"]
    untouched = ["--lr=-1e-4", "-1e-4", "--targets", "-q"]
    assert joined_negative_values(untouched) == untouched
    for argv, flag in [(["--lr", "-1e-4"], "--lr"), (["--weight-decay", "-2E+1"], "--weight-decay"),
                       (["--lr", "-inf"], "--lr")]:
        with pytest.raises(SystemExit):
            train.main(argv)
        err = capsys.readouterr().err
        assert f"{flag} must be in" in err and "expected one argument" not in err, err


def test_range_edges_inside():
    c = TrainConfig(dropout=0.0, head_dropout=0.0, warmup_ratio=1.0, min_lr_ratio=0.0, ckpt_every=0, max_steps=0,
                    workers=0, label_smoothing=0.0, grad_clip=0.0).resolved()
    assert (c.dropout, c.ckpt_every, c.warmup_ratio) == (0.0, 0, 1.0)


def test_help_groups_every_flag_as_the_readme_table_and_shows_allowed_values():
    import dataclasses
    import re
    import subprocess
    import sys
    from pathlib import Path

    from nanopeft.config import FLAG_GROUPS, TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    grouped = [n for names in FLAG_GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(fields) and len(grouped) == len(set(grouped))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for group, names in FLAG_GROUPS.items():
        row = next(ln for ln in readme.splitlines() if ln.startswith(f"| {group} |"))
        shown = set(re.findall(r"--([a-z0-9-]+)", row))
        assert {n.replace("_", "-") for n in names} <= shown, (group, row)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=root, capture_output=True, text=True).stdout
    assert "--method {lora,dora,bitfit,layernorm,ssf,vpt,adaptformer,full,frozen,linear-probe,knn,resnet18,vit-small}" in out and " STR" not in out
    assert all(f"\n{g}:\n" in out for g in FLAG_GROUPS)


def test_method_qlora_says_what_it_is_called():
    with pytest.raises(ValueError, match=r"QLoRA is --method lora on the NF4 base .*\(QDoRA\) is --method dora"):
        TrainConfig(method="qlora").resolved()
