"""params.yaml validation: every bad value is one clear ConfigError, overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from varstudent.config import Params, load_params
from varstudent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_valid_and_complete() -> None:
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # every setting is written out in the committed file, so params.yaml documents all knobs
    assert set(raw) == set(Params().to_dict())
    for section, values in Params().to_dict().items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), section
    assert params.data.dataset == "mnist" and params.student.arch == "mlp-500-50"


@pytest.mark.parametrize("override,message", [
    ("distill.kd_wieght=1", "unknown key 'distill.kd_wieght'"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("distill.kd_weight=-1", "distill.kd_weight: must be >= 0.0"),
    ("distill.temperature=0", "distill.temperature: must be > 0.0"),
    ("distill.epochs=2.5", "distill.epochs: expected an integer"),
    ("distill.epochs=true", "distill.epochs: expected an integer"),
    ("distill.lr=fast", "distill.lr: expected a number"),
    ("distill.lr=.nan", "distill.lr: expected a finite number"),
    ("distill.bsr_norm=l3", "distill.bsr_norm: must be one of linf, l2"),
    ("runtime.progress=3", "runtime.progress: expected true or false"),
    ("prune.threshold=9", "prune.threshold: must be <= 8.0"),
    ("data.test_fraction=0", "data.test_fraction: must be > 0.0"),
    ("distill=3", "distill: expected a mapping"),
    ("teacher.source=models:/varstudent-teacher", "teacher.source: unknown name 'models:/varstudent-teacher' "
                                                  "(known: train, models:/NAME@ALIAS, models:/NAME/VERSION)"),
    ("register.champion_rule=best", "register.champion_rule: must be one of balanced, accuracy, compression"),
    ("register.max_accuracy_drop=2", "register.max_accuracy_drop: must be <= 1.0"),
    ("register.min_compression=0.5", "register.min_compression: must be >= 1.0"),
    ("novalue", "--set expects section.key=value"),
    ("export.formats=[sparse,tflite]", "export.formats: unknown name 'tflite' (known: compact, compact_fp16, "
                                       "compact_bf16, sparse, onnx)"),
    ("export.formats=[]", "export.formats: expected a non-empty list of names"),
    ("export.formats=3", "export.formats: expected a non-empty list of names"),
    ("export.formats=[onnx,sparse,onnx]", "export.formats: 'onnx' is listed twice"),
    ("tune.batch_size=[50,0]", "tune.batch_size: must be >= 1; got 0"),
    ("tune.batch_size=[50,50]", "tune.batch_size: 50 is listed twice"),
    ("tune.batch_size=[50.5]", "tune.batch_size: expected an integer, got 50.5"),
    ("tune.batch_size=big", "tune.batch_size: expected a list of integers such as [50, 100]"),
    ("export.sparse_values=int8", "export.sparse_values: must be one of float32, float16"),
    ("tune.vd_weight=[0,1]", "tune.vd_weight: low must be > 0 when sampled in log space (tune.log_scale); got 0"),
    ("tune.grace_period=10", "tune.grace_period (10) must exceed tune.heartbeat_interval (10)"),
])
def test_bad_values_are_one_clear_error(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_are_read_as_yaml_and_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("distill:\n  kd_weight: 0.5\n  epochs: 3\n")
    params = load_params(path, ["distill.epochs=7", "data.dataset=dir:/x/y", "tracking.enabled=false"])
    assert params.distill.kd_weight == 0.5 and params.distill.epochs == 7
    assert params.data.dataset == "dir:/x/y" and params.tracking.enabled is False
    assert isinstance(load_params(None, ["distill.lr=1"]).distill.lr, float)


def test_a_key_given_twice_in_a_params_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("distill:\n  epochs: 2\nteacher:\n  epochs: 1\ndistill:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML \(line 5\): duplicate key 'distill'"):
        load_params(path)  # plain YAML keeps the last: the first distill section would vanish
    path.write_text("distill:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_params(path)


def test_a_number_for_a_string_setting_is_that_string() -> None:
    assert load_params(None, ["kfp.cpu_request=2"]).kfp.cpu_request == "2"
    assert load_params(None, ["kfp.cpu_request=0.5"]).kfp.cpu_request == "0.5"


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(scalar)


# one setting of every section (and the top-level seed), each changed from its default to a valid value
DIGEST_OVERRIDES = ["seed=1", "data.test_fraction=0.25", "validate.max_class_ratio=3", "teacher.epochs=6",
                    "student.width=0.5", "distill.kd_weight=0.31", "prune.threshold=2.5",
                    "export.sparse_values=float16", "evaluate.latency_warmup=4", "runtime.device=cpu",
                    "train.checkpoint_every=2", "tracking.experiment=other", "services.retries=3",
                    "tune.kd_weight=[0.1, 2.0]", "kfp.tune_workers=2", "register.min_compression=5"]


def test_digest_overrides_cover_every_section() -> None:
    assert {o.split("=")[0].split(".")[0] for o in DIGEST_OVERRIDES} == set(Params().to_dict())


@pytest.mark.parametrize("override", DIGEST_OVERRIDES)
def test_digest_changes_with_any_setting(override: str) -> None:
    assert load_params(None).digest() == load_params(None).digest()
    assert load_params(None).digest() != load_params(None, [override]).digest()


def test_a_list_of_choices_is_a_tuple_and_one_name_is_a_list_of_one() -> None:
    assert load_params(None).export.formats == ("compact", "sparse", "onnx")
    assert load_params(None, ["export.formats=[onnx, compact_fp16]"]).export.formats == ("onnx", "compact_fp16")
    assert load_params(None, ["export.formats=sparse"]).export.formats == ("sparse",)
    # YAML, JSON and MLflow get plain lists
    assert load_params(None).to_dict()["export"]["formats"] == ["compact", "sparse", "onnx"]
