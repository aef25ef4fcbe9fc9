"""Contrastive loss (duplicate-gold masking, extra negatives) and the strict config loader."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ConfigError, LossConfig, load_config
from train.loss import contrastive_loss, duplicate_gold_mask

HEADS = ("overall", "text", "vision", "cross")


def only_overall():
    return LossConfig(text_weight=0.0, vision_weight=0.0, cross_weight=0.0)


def test_duplicate_gold_masking_changes_only_rows_with_duplicates():
    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    scores = {h: logits for h in HEADS}
    golds = torch.tensor([10, 11, 12, 12])  # mentions 2 and 3 share their gold entity
    masked, _ = contrastive_loss(scores, golds, golds, only_overall())
    plain, _ = contrastive_loss(scores, golds, golds, LossConfig(text_weight=0.0, vision_weight=0.0, cross_weight=0.0,
                                                                  mask_duplicate_golds=False))
    rows = F.cross_entropy(logits, torch.arange(4), reduction="none")
    fixed = rows.clone()
    for i, other in ((2, 3), (3, 2)):
        keep = [j for j in range(4) if j != other]
        fixed[i] = -F.log_softmax(logits[i, keep], 0)[keep.index(i)]
    torch.testing.assert_close(plain, rows.mean())
    torch.testing.assert_close(masked, fixed.mean())
    assert fixed[0] == rows[0] and fixed[1] == rows[1]
    assert fixed[2] < rows[2] and fixed[3] < rows[3]


def test_masking_is_a_no_op_without_duplicates():
    logits = torch.randn(3, 3)
    golds = torch.tensor([1, 2, 3])
    a, _ = contrastive_loss({h: logits for h in HEADS}, golds, golds, LossConfig())
    b, _ = contrastive_loss({h: logits for h in HEADS}, golds, golds, LossConfig(mask_duplicate_golds=False))
    torch.testing.assert_close(a, b)


def test_extra_negatives_widen_the_softmax_and_a_mined_gold_is_masked():
    logits = torch.zeros(2, 4)  # 2 mentions, 2 golds + 2 extra negatives, all scores equal
    golds = torch.tensor([5, 6])
    candidates = torch.tensor([5, 6, 7, 5])  # the last "negative" is mention 0's gold
    loss, parts = contrastive_loss({h: logits for h in HEADS}, golds, candidates, only_overall())
    # mention 0: 3 live candidates -> log 3; mention 1: 4 candidates -> log 4
    torch.testing.assert_close(loss, torch.tensor((math.log(3) + math.log(4)) / 2))
    assert duplicate_gold_mask(golds, candidates).tolist() == [[False, False, False, True], [False] * 4]


def test_row_weights_drop_padding_rows_from_the_mean():
    logits = torch.randn(3, 3)
    golds = torch.arange(3)
    scores = {h: logits for h in HEADS}
    weighted, _ = contrastive_loss(scores, golds, golds, only_overall(), row_weight=torch.tensor([1.0, 0.0, 1.0]))
    rows = F.cross_entropy(logits, golds, reduction="none")
    torch.testing.assert_close(weighted, (rows[0] + rows[2]) / 2)


def test_head_weights_and_moe_losses_add_up():
    from moe.switch import MoEOutput
    from moe.units import MoELog

    logits = torch.randn(3, 3)
    golds = torch.arange(3)
    log = MoELog()
    log.add("text", MoEOutput(torch.zeros(1), torch.tensor(2.0), torch.tensor(3.0), torch.zeros(4), torch.tensor(0)))
    cfg = LossConfig(overall_weight=1.0, text_weight=0.5, vision_weight=0.0, cross_weight=2.0, aux_coef=0.1, z_coef=0.01)
    total, parts = contrastive_loss({h: logits * (i + 1) for i, h in enumerate(HEADS)}, golds, golds, cfg, log)
    expected = sum(w * F.cross_entropy(logits * (i + 1), golds) for i, w in enumerate((1.0, 0.5, 0.0, 2.0))) + 0.2 + 0.03
    torch.testing.assert_close(total, expected)
    assert parts["loss_aux"] == 2.0 and parts["loss_z"] == 3.0


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  matcher:\n    moe:\n      top_kk: 3\n")
    with pytest.raises(ConfigError, match=r"model\.matcher\.moe\.top_kk"):
        load_config(path)
    path.write_text("model:\n  matcher:\n    moe:\n      top_k: three\n")
    with pytest.raises(ConfigError, match=r"model\.matcher\.moe\.top_k: expected int"):
        load_config(path)
    path.write_text("loss:\n  aux_coef: 1\n")
    assert load_config(path).loss.aux_coef == 1.0


def test_switching_one_unit_off_changes_only_its_key_for_a_resume(tmp_path):
    from train.checkpointing import fixed_settings

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  matcher:\n    hidden: 16\n")  # no units listed, as in launch/configs
    before, after = (fixed_settings(load_config(config, extra)) for extra in ([], ["model.matcher.units.cross=false"]))
    assert [k for k in before if before[k] != after.get(k)] == ["model.matcher.units.cross"]
    assert load_config(config, ["model.matcher.units.cross=false"]).model.matcher.units == {
        "text": True, "vision": True, "cross": False}


def test_config_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(None, ["model.matcher.moe.top_k=2", "model.matcher.units.cross=false", "loss.z_coef=0.5"])
    assert cfg.model.matcher.moe.top_k == 2
    assert cfg.model.matcher.units["cross"] is False
    assert cfg.loss.z_coef == 0.5
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["model.matcher.moe.top_k"])


def test_floats_written_without_a_dot_are_accepted_and_non_numbers_are_not():
    cfg = load_config(None, ["train.lr=1e-3", "train.clip_lr=5E-6", "loss.aux_coef=2"])
    assert cfg.train.lr == 1e-3 and cfg.train.clip_lr == 5e-6 and cfg.loss.aux_coef == 2.0
    for bad in ("abc", "1e-3x", "''"):
        with pytest.raises(ConfigError, match=r"train\.lr: expected"):
            load_config(None, [f"train.lr={bad}"])
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int"):
        load_config(None, ["data.batch_size=1e2"])  # an int field stays an int


@pytest.mark.parametrize("setting, message", [
    ("data.batch_size=0", r"data\.batch_size: must be >= 1, got 0"),
    ("train.grad_accum=0", r"train\.grad_accum: must be >= 1, got 0"),
    ("train.epochs=-1", r"train\.epochs: must be >= 1, got -1"),
    ("train.lr=0", r"train\.lr: must be > 0"),

    ("train.log_every=0", r"train\.log_every: must be >= 1"),
    ("data.train_fraction=1.5", r"data\.train_fraction: must be in \(0, 1\]"),
    ("train.adam_betas=[0.9,1.0]", r"train\.adam_betas\[1\]: must be in \[0, 1\)"),
    ("eval.recall_at=[10,0]", r"eval\.recall_at\[1\]: must be >= 1"),
    ("model.matcher.moe.capacity_factor=0", r"model\.matcher\.moe\.capacity_factor: must be > 0"),
    ("model.matcher.moe.top_k=5", r"model\.matcher\.moe\.top_k \(5\) cannot exceed"),
    ("train.max_bad_steps=-1", r"train\.max_bad_steps: must be >= 0"),
])
def test_out_of_range_values_are_refused_naming_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [setting])


def config_fields(cls, prefix=""):
    """(key, dataclass field, type) of every leaf field of the config tree under ``cls``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


# Checked by its own code before the ranges are: check_ep_size (>= 1 and divides num_experts).
RANGE_EXEMPT = {"model.matcher.moe.ep_size"}


def test_every_numeric_config_field_declares_a_range_or_choices():
    import typing

    from core.typed_config import RANGE
    from model.config import Config

    numeric = [(key, f, tp) for key, f, tp in config_fields(Config)
               if tp in (int, float) or typing.get_args(tp) in ((int,), (float,))
               or typing.get_origin(tp) is typing.Literal and all(isinstance(c, int) for c in typing.get_args(tp))]
    assert len(numeric) > 60
    undeclared = [key for key, f, tp in numeric
                  if RANGE not in f.metadata and typing.get_origin(tp) is not typing.Literal]
    assert sorted(undeclared) == sorted(RANGE_EXEMPT)
    Config()  # the defaults are in range


def test_every_choice_field_refuses_an_unknown_value_when_its_section_is_built_in_code():
    import dataclasses
    import typing

    from model.config import Config

    def sections(cls, prefix=""):
        yield prefix, cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from sections(hints[f.name], f"{prefix}{f.name}.")

    checked = 0
    for prefix, cls in sections(Config):
        for f in dataclasses.fields(cls):
            if typing.get_origin(typing.get_type_hints(cls)[f.name]) is typing.Literal:
                with pytest.raises(ConfigError, match=rf"^{prefix}{f.name}: expected one of \(.*\), got 'bogus'$"):
                    cls(**{f.name: "bogus"})
                checked += 1
    assert checked >= 17


@pytest.mark.parametrize("value, shown", [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"), ("inf", "str 'inf'"),
                                          ("nan", "str 'nan'"), ("1" + "0" * 400, "1000")])
def test_non_finite_numbers_are_refused_as_not_finite(value, shown):
    with pytest.raises(ConfigError, match=rf"train\.lr: must be a finite number, got {shown}"):
        load_config(None, [f"train.lr={value}"])
    with pytest.raises(ConfigError, match=rf"train\.adam_betas\[1\]: must be a finite number, got {shown}"):
        load_config(None, [f"train.adam_betas=[0.9,{value}]"])


def test_non_finite_numbers_set_in_code_are_refused_as_not_finite():
    from model.config import Config, TrainConfig

    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number, got inf"):
        Config(train=TrainConfig(lr=math.inf))


@pytest.mark.parametrize("name", ["../escape", "..", ".", "/tmp/abs", "a/b", ".hidden", "-dash", "", "a b", "tab\tname",
                                  "caf\u00e9", "x" * 101, "x" * 300])
def test_run_names_that_are_not_one_plain_folder_are_refused(name):
    with pytest.raises(ConfigError, match=r"train\.run_name: .* is not a run name: use letters, digits and \. _ - only"):
        load_config(None, [f"train.run_name='{name}'"])


@pytest.mark.parametrize("name", ["run", "demo-both", "wikimel_v1.2", "x" * 100, "0"])
def test_plain_run_names_are_accepted(name):
    assert load_config(None, [f"train.run_name='{name}'"]).train.run_name == name


def test_the_repository_run_names_and_seed_suffixes_are_valid():
    from pathlib import Path

    from launch.seeds import seed_config
    from model.config import check_run_name

    configs = sorted((Path(__file__).parent.parent.parent / "launch" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        for modality in ("both", "text", "image"):  # scripts/demo.sh
            check_run_name(load_config(path, [f"train.run_name=demo-{modality}"]).train.run_name)
        check_run_name(seed_config(cfg, 43).train.run_name)
        check_run_name(f"{cfg.train.run_name}-seeds")
