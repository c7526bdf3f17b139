"""nanopeft/training/build.py: the architecture a run uses when no weights are read (--dry-run)."""

import json

from nanopeft.config import PRESETS
from nanopeft.training.build import backbone_config


def test_backbone_config_reads_config_json_else_the_name_and_never_shares_a_preset(tmp_path):
    vitl = backbone_config(str(tmp_path / "dinov3-vitl16-pretrain-lvd1689m"))  # no folder: from the name
    assert vitl.hidden_size == PRESETS["vitl16"].hidden_size == 1024
    assert backbone_config(str(tmp_path / "my-weights")).hidden_size == PRESETS["vit7b16"].hidden_size
    cfg = backbone_config(str(tmp_path / "dinov3-vit7b16"))
    assert cfg is not PRESETS["vit7b16"]  # the model's RoPE switch writes to its config
    cfg.pos_embed_rescale = None
    assert PRESETS["vit7b16"].pos_embed_rescale == 2.0
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps(PRESETS["tiny"].to_dict()))
    got = backbone_config(str(tmp_path / "w"))
    assert (got.hidden_size, got.num_hidden_layers) == (PRESETS["tiny"].hidden_size, PRESETS["tiny"].num_hidden_layers)
