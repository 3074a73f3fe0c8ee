from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from cascade.config import ConfigError, apply_overrides, coerce, from_dict, load, parse_override, to_dict

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    mlp: tuple[int, ...] = (64, 32)
    opt: Literal["adamw", "adagrad"] = "adamw"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    seed: int = 0
    inner: Inner = field(default_factory=Inner)
    path: str | None = None

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def test_from_dict_builds_nested_and_coerces():
    c = from_dict(Outer, {"seed": 3, "inner": {"lr": 1, "mlp": [8, 4]}})
    assert c.seed == 3 and c.inner.lr == 1.0 and isinstance(c.inner.lr, float)
    assert c.inner.mlp == (8, 4)
    assert to_dict(c) == {"name": "x", "seed": 3, "inner": {"lr": 1.0, "mlp": [8, 4], "opt": "adamw"}, "path": None}


def test_unknown_key_names_dotted_path():
    with pytest.raises(ConfigError, match=r"'inner\.lrr'"):
        from_dict(Outer, {"inner": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"seed": "3"}, "seed: expected an integer"),
        ({"seed": True}, "seed: expected an integer"),
        ({"inner": {"mlp": [8, "a"]}}, r"inner.mlp\[1\]"),
        ({"inner": {"opt": "sgd"}}, "inner.opt"),
        ({"inner": 5}, "inner: expected a table"),
    ],
)
def test_wrong_types_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(Outer, data)


def test_post_init_validation_is_reported_as_config_error():
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        from_dict(Outer, {"seed": -1})


def test_overrides_parse_toml_values_and_type_check(tmp_path):
    assert parse_override("inner.mlp=[1,2]") == (["inner", "mlp"], [1, 2])
    assert parse_override("name=hello") == (["name"], "hello")
    p = tmp_path / "c.toml"
    p.write_text('seed = 1\n[inner]\nlr = 0.5\n')
    c = load(Outer, p, ["inner.lr=0.25", "path=data/x"])
    assert c.inner.lr == 0.25 and c.seed == 1 and c.path == "data/x"
    with pytest.raises(ConfigError, match="seed"):
        load(Outer, p, ["seed=1.5"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "missing.toml")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


# ---------------------------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class WithFactory:
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5, opt="adagrad"))


def test_a_partial_table_merges_over_the_fields_own_default():
    # the field's default is Inner(lr=0.5, opt="adagrad"), not Inner(): a one-key table keeps the other two values
    c = from_dict(WithFactory, {"inner": {"mlp": [4]}})
    assert c.inner == Inner(lr=0.5, mlp=(4,), opt="adagrad")
    # with a base, every left-out key keeps the base's value, recursively
    base = WithFactory(Inner(lr=0.1, mlp=(2,), opt="adamw"))
    assert from_dict(WithFactory, {"inner": {"lr": 0.2}}, base=base).inner == Inner(lr=0.2, mlp=(2,), opt="adamw")


def test_pipeline_overrides_change_one_value_of_the_section_default():
    from cascade.pipeline import PipelineConfig, load_config

    # no file: the teacher stays the default DCN-V2 (it became a plain DNN when the table was rebuilt from
    # RankerConfig's own defaults)
    teacher = load_config(None, ["teacher.model.emb_dim=16"]).teacher.model
    assert teacher == dataclasses.replace(PipelineConfig().teacher.model, emb_dim=16)
    assert teacher.backbone == "dcnv2" and teacher.cross_rank == 32
    # a file that does not spell the table out: the retrieval student stays a retrieval student (sampled softmax)
    ml = load_config(ROOT / "pipelines" / "movielens.toml", ["students.retrieval.epochs=1", f'data.path="{ROOT}"'])
    assert ml.students.retrieval == dataclasses.replace(PipelineConfig().students.retrieval, epochs=1)
    # a derived default is decided again after the merge: PFD's distillation term is its cross-entropy
    distill = load_config(None, ["students.rank_distill.pfd_lambda=0.5"]).students.rank_distill
    assert distill.kd is None and distill.kd_loss == "hinton" and distill.w_kd == 1.0


@pytest.mark.parametrize("key", ["replay.prerank_quotas=true", "replay.prerank_quotas=false",
                                 "replay.two_tower_quota=0.5"])
def test_a_channel_setting_beside_no_channels_is_refused(key):
    from cascade.pipeline import load_config
    from cascade.serve.cascade import channel_settings

    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(name)} = \w.* is set but replay.channels is empty.*nothing"):
        load_config(None, ["replay.channels=[]", key])
    # replay.channels unset beside a build of no channel: no multi-channel cascade either
    with pytest.raises(ConfigError, match=rf"{re.escape(name)} = \w.* is set but channels.build builds no channel, "
                                          r"so no multi-channel cascade is replayed: it would do nothing"):
        load_config(None, ["channels.build=[]", "students.popularity_prior_grid=[0]", "ranklog.channel_share=0", key])
    unset = load_config(None, ["replay.channels=[]"]).replay  # no channels and neither set: fine
    assert unset.prerank_quotas is None and unset.two_tower_quota is None
    with_channels = load_config(None, [key]).replay  # beside the default channels: taken as set
    field_name = name.split(".")[1]
    assert getattr(with_channels, field_name) == tomllib.loads(key.replace("replay.", ""))[field_name]
    # unset beside channels: the cascade's defaults, 0.5 of the slots and a pre-rank that keeps the quotas
    s = channel_settings(("popular", "itemcf"), None, None)
    assert (s.channels, s.two_tower_quota, s.prerank_quotas) == (("popular", "itemcf"), 0.5, True)
    s = channel_settings(("popular",), 0.25, False)
    assert (s.two_tower_quota, s.prerank_quotas) == (0.25, False)


@pytest.mark.parametrize("key, what", [("teacher.train.seed=7", "run.seed"),
                                       ("students.rank_student_train.seed=1", "run.seed"),
                                       ("students.prerank.progress=true", "--no-progress"),
                                       ("students.retrieval.distill_scale=0.5", "students.distill"),
                                       ("students.retrieval.eval_k=5", "students step")])
def test_keys_the_pipeline_sets_itself_are_refused(key, what):
    from cascade.pipeline import load_config

    with pytest.raises(ConfigError, match=rf"{re.escape(key.split('=')[0])} cannot be set.*{re.escape(what)}"):
        load_config(None, [key])


# ---------------------------------------------------------------------------------------------------- pipelines/


def _leaves(data: dict, cls, default, prefix: str = ""):
    """(dotted key, type, value given, schema default) of every value a (partial) config table sets: a nested
    table of a dataclass-typed field is walked, any other value (a list, a loss-weight table) is one leaf."""
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        tp, d = hints[k], getattr(default, k)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            yield from _leaves(v, tp, d, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", tp, v, d


@pytest.mark.parametrize("path",
                         sorted(p.name for p in (ROOT / "pipelines").glob("*.toml") if p.name != "custom.example.toml"))
def test_pipeline_files_set_only_values_that_differ_from_the_schema(path):
    """One source of truth: the schema's dataclasses hold every default, a pipeline file only what differs."""
    from cascade.pipeline import PipelineConfig, load_config
    from cascade.pipeline.ablation import AblationSettings, load_ablation_config

    raw = tomllib.loads((ROOT / "pipelines" / path).read_text())
    ablation = raw.pop("ablation", None)
    given = list(_leaves(raw, PipelineConfig, PipelineConfig()))
    if ablation is not None:
        given += list(_leaves(ablation, AblationSettings, AblationSettings(), "ablation."))
    restated = [key for key, tp, v, d in given if to_dict(coerce(v, tp, key)) == to_dict(d)]
    assert not restated, f"pipelines/{path} restates schema defaults: {restated}"
    # and the file loads (real-data pipelines need a data.path; any existing folder does for the check)
    if ablation is not None:
        load_ablation_config(ROOT / "pipelines" / path)
    else:
        load_config(ROOT / "pipelines" / path,
                    [f'data.path="{ROOT}"'] if raw.get("data", {}).get("source", "world") != "world" else [])


@dataclass(frozen=True)
class Checked:
    lr: float = 1e-3
    weights: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        from cascade.config import positive, require

        require(self, "lr", positive(self.lr), "must be a finite number > 0")


@dataclass(frozen=True)
class Holder:
    train: Checked = field(default_factory=Checked)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0])
def test_a_field_check_is_named_by_its_dotted_key(value):
    from cascade.config import FieldError

    with pytest.raises(ConfigError) as e:
        from_dict(Holder, {"train": {"lr": value}})
    assert str(e.value) == f"train.lr = {value!r}: must be a finite number > 0"
    with pytest.raises(FieldError, match=r"Checked.lr = .*: must be a finite number > 0"):
        Checked(lr=value)  # built directly: the class names it


def test_model_and_training_configs_check_every_value():
    from cascade.models.ranker import RankerConfig
    from cascade.models.two_tower import TowerConfig
    from cascade.train.joint import DistillConfig
    from cascade.train.loop import TrainConfig
    from cascade.train.students import StudentConfig

    for cls, kwargs, needle in ((TrainConfig, {"grad_clip": -1.0}, "TrainConfig.grad_clip = -1.0"),
                                (TrainConfig, {"weight_decay": -0.1}, "TrainConfig.weight_decay"),
                                (TrainConfig, {"lr": float("nan")}, "TrainConfig.lr = nan"),
                                (TrainConfig, {"seed": -1}, "TrainConfig.seed = -1"),
                                (RankerConfig, {"mlp": (-5,)}, "RankerConfig.mlp = (-5,)"),
                                (RankerConfig, {"dropout": 1.0}, "RankerConfig.dropout"),
                                (TowerConfig, {"hidden": (0,)}, "TowerConfig.hidden"),
                                (TowerConfig, {"temperature": float("inf")}, "TowerConfig.temperature = inf"),
                                (StudentConfig, {"loss_weights": {"pointwise": -1.0}},
                                 "StudentConfig.loss_weights.pointwise = -1.0"),
                                (StudentConfig, {"grad_clip": 0.0}, "StudentConfig.grad_clip = 0.0"),
                                (DistillConfig, {"w_kd": float("nan")}, "DistillConfig.w_kd = nan"),
                                (DistillConfig, {"w_bce": -1.0}, "DistillConfig.w_bce = -1.0")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            cls(**kwargs)


@pytest.mark.parametrize("key", ["replay.two_tower_quota=0.3", "replay.channel_quotas={popular=2}"])
def test_a_quota_setting_beside_a_score_normalised_union_is_refused(key):
    from cascade.pipeline import load_config
    from cascade.serve.cascade import channel_settings

    name = key.split("=")[0]
    # the message names its key: no section prefix before it ("replay: replay.merge ...")
    with pytest.raises(ConfigError, match=r"^replay.merge = 'scores' merges the channels by their standardised "
                                          rf"scores, without quotas, but {re.escape(name)} = .* is set: it would do "
                                          r"nothing \(leave it unset, or set replay.merge = 'quotas'\)"):
        load_config(None, ['replay.merge="scores"', key])
    with pytest.raises(ValueError, match=r"replay.merge = 'scores' .* replay.two_tower_quota = 0.3 is set"):
        channel_settings(("popular",), 0.3, None, None, "scores")
    with pytest.raises(ValueError, match=r"but replay.two_tower_quota = 0.3, replay.channel_quotas = \{'popular': "
                                         r"2.0\} are set: it would do nothing \(leave them unset"):
        channel_settings(("popular",), 0.3, None, {"popular": 2.0}, "scores")
    with pytest.raises(ValueError, match=r"replay.merge must be one of \['quotas', 'scores'\], got 'Scores'"):
        channel_settings(("popular",), None, None, None, "Scores")
    # the pre-rank keeps each channel's share of the request's union unless told not to
    for sets, keep in (([], True), (["replay.prerank_quotas=false"], False)):
        cfg = load_config(None, ['replay.merge="scores"', *sets]).replay
        s = channel_settings(("popular", "itemcf"), cfg.two_tower_quota, cfg.prerank_quotas, cfg.channel_quotas,
                             cfg.merge)
        assert (s.merge, s.two_tower_quota, s.prerank_quotas, s.quotas) == ("scores", None, keep, None)
    with pytest.raises(ConfigError, match=r"replay.merge = scores is set but replay.channels is empty.*nothing"):
        load_config(None, ["replay.channels=[]", 'replay.merge="scores"'])
    with pytest.raises(ConfigError, match=r"^replay.merge: value 'rrf' is not one of \['quotas', 'scores'\] "
                                          r"\(or unset\)$"):
        load_config(None, ['replay.merge="rrf"'])
    # "(or unset)" only where the key itself may be unset, not for an element of it
    with pytest.raises(ConfigError, match=r"^replay.channel_quotas.popular: expected a number, got 'x'$"):
        load_config(None, ['replay.channel_quotas={popular="x"}'])


def test_channel_quotas_weigh_the_channels_share_of_the_retrieval_slots():
    from cascade.channels import MergedRetriever
    from cascade.pipeline import load_config
    from cascade.serve.cascade import channel_settings, channel_shares

    # hand-worked: the two-tower keeps 0.5; popular weighs 2, itemcf and als 1 each (unnamed): 0.5 x 2/4, 0.5 x 1/4
    assert channel_shares(("popular", "itemcf", "als"), 0.5, {"popular": 2.0}) == \
        {"popular": 0.25, "itemcf": 0.125, "als": 0.125}
    assert channel_shares(("popular", "itemcf"), 0.2, None) == {"popular": 0.4, "itemcf": 0.4}  # evenly
    s = channel_settings(("popular", "itemcf", "als"), None, None, {"als": 3.0})
    assert s.quotas == {"popular": 1.0, "itemcf": 1.0, "als": 3.0}
    with pytest.raises(ValueError, match=r"replay.channel_quotas weighs \['content'\], which the multi-channel "
                                         r"cascade does not hold \(its channels: \['popular'\]\)"):
        channel_settings(("popular",), None, None, {"content": 2.0})

    # the merged stage fills the slots in those shares: channels with disjoint lists, 40 slots
    class Fixed:
        def __init__(self, start):
            self.start = start

        def select(self, requests, candidates, n):
            items = np.arange(self.start, self.start + n)[None, :].repeat(len(requests), 0)
            return items, np.zeros(items.shape, np.float32)

    shares = channel_shares(("popular", "itemcf", "als"), 0.5, {"popular": 2.0})
    merged = MergedRetriever({"two_tower": Fixed(0), "popular": Fixed(1000), "itemcf": Fixed(2000),
                              "als": Fixed(3000)}, {"two_tower": 0.5, **shares})
    _, _, origin = merged.select_with_origin(np.zeros(3), 40)
    assert [int((origin[0] == c).sum()) for c in range(4)] == [20, 10, 5, 5]

    # the config: a table of positive weights over channels the multi-channel cascade holds
    cfg = load_config(None, ["replay.channel_quotas={popular=2, als=0.5}"]).replay
    assert cfg.channel_quotas == {"popular": 2.0, "als": 0.5}
    for override, needle in (
            ("replay.channel_quotas={two_tower=2}", "the two-tower's share of the slots is replay.two_tower_quota"),
            ("replay.channel_quotas={popularity=2}", r"names unknown channel\(s\) \['popularity'\]"),
            ("replay.channel_quotas={popular=0}", r"every weight must be a finite number > 0, got \{'popular': 0.0\}"),
            ("replay.channel_quotas={popular=nan}", "every weight must be a finite number > 0")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"replay.channel_quotas = \{'popular': 2.0\} is set but replay.channels is "
                                          r"empty.*it would do nothing"):
        load_config(None, ["replay.channels=[]", "replay.channel_quotas={popular=2}"])
    with pytest.raises(ConfigError, match=r"replay.channel_quotas weighs \['als'\], which the multi-channel cascade "
                                          r"does not hold \(replay.channels = \['popular', 'itemcf'\]\)"):
        load_config(None, ['replay.channels=["popular", "itemcf"]', "replay.channel_quotas={als=2}"])
    with pytest.raises(ConfigError, match=r"weighs \['ease'\].*every channel of channels.build"):
        load_config(None, ["replay.channel_quotas={ease=2}"])  # ease is not built by default


@pytest.mark.parametrize("key, value, needs", [
    ("popular_window_days", "[3.0]", '"popular"'), ("itemcf_neighbours", "10", '"itemcf"'),
    ("history_length", "5", '"itemcf" or "content"'), ("content_column", '"genre"', '"content"'),
    ("als_factors", "[8]", '"als"'), ("als_index", '"Flat"', '"als"'), ("ease_lambdas", "[10.0]", '"ease"')])
def test_a_channel_setting_beside_no_channel_that_reads_it_is_refused(key, value, needs):
    from cascade.pipeline import load_config
    from cascade.pipeline.config import ChannelsSection

    built = ["channels.build=[\"recent\"]", "students.popularity_prior_grid=[0]", "ranklog.channel_share=0",
             "replay.channels=[\"recent\"]"]
    with pytest.raises(ConfigError, match=rf"channels.{key} = .*: is set but channels.build has no "
                                          rf"{re.escape(needs)}: it would do nothing"):
        load_config(None, [*built, f"channels.{key}={value}"])
    load_config(None, [*built])  # left at their defaults: fine
    # beside every channel it is taken as set
    every = load_config(None, ['channels.build=["popular", "recent", "itemcf", "content", "als", "ease"]',
                               f"channels.{key}={value}"]).channels
    assert getattr(every, key) != getattr(ChannelsSection(), key)
