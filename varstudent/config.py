"""Typed, frozen settings for every stage, filled from params.yaml (the one source of settings).

Each section of params.yaml is one dataclass below. A field's metadata carries its valid range or choices
and a one-line reason; `load_params` rejects unknown keys, wrong types and out-of-range values with one
clear line. CLI, DVC and KFP all go through `load_params`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from varstudent.errors import ConfigError

# names checked when params are read, so a typo fails before any stage spends time
ARCH_PATTERN = r"mlp(-\d+)+|lenet-300-100|lenet5|vgg-like"
DATASET_PATTERN = r"mnist|fashion-mnist|cifar10|mnist5k|digits|dir:.+"
TEACHER_SOURCE_PATTERN = r"train|models:/[^/@]+(@[A-Za-z0-9_-]+|/\d+)"
# MLflow stores this project can log to: a database or a tracking server (MLflow 3 keeps its plain-folder file
# store in maintenance mode and refuses it; an unsupported scheme failed only when the first stage logged)
TRACKING_URI_PATTERN = r"sqlite:///.+|https?://.+|(postgresql|mysql|mssql)(\+\w+)?://.+"
# upper bounds that catch a typo (an extra zero or two) before it turns into an out-of-memory crash or a
# year-long run; far above anything this project trains
MAX_WIDTH = 64.0
MAX_EPOCHS = 100_000
MAX_LOSS_WEIGHT = 1e6
MAX_UNITS = 16_384  # per hidden layer of mlp-H1-H2-...


def _check_hidden_units(name: str, arch: str) -> None:
    """mlp-H1-H2-...: every H in 1..MAX_UNITS (0 trained a dead layer; a typo's extra digits ran out of memory)."""
    if arch.startswith("mlp-"):
        bad = [int(h) for h in arch.split("-")[1:] if not 1 <= int(h) <= MAX_UNITS]
        if bad:
            raise ConfigError(f"{name}: hidden layer sizes must be 1..{MAX_UNITS}; got {bad[0]} in {arch!r}")


def _f(default: Any, why: str, *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, choices: tuple[str, ...] | None = None, pattern: str | None = None,
       allow_empty: bool = False, known: str | None = None) -> Any:
    """A field with its reason and its valid range (lo/hi inclusive unless lo_open) or name pattern (`known`:
    how the error message lists the accepted names); a list of names may be empty only with allow_empty."""
    return field(default=default, metadata={"why": why, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "choices": choices, "pattern": pattern, "allow_empty": allow_empty,
                                            "known": known})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("mnist", "mnist | fashion-mnist | cifar10 | mnist5k | digits | dir:PATH (IDX files)",
                      pattern=DATASET_PATTERN)
    raw_dir: str = _f("data/raw", "where prepare keeps downloaded archives; training never reads it")
    test_fraction: float = _f(0.2, "held-out share for datasets without an official test split",
                              lo=0.0, hi=0.9, lo_open=True)
    train_size: int = _f(0, "low-data runs: keep this many training samples (stratified, seeded); 0 = all", lo=0)
    fraction: float = _f(1.0, "low-data runs: keep this share of the training samples (stratified, "
                         "seeded); 1 = all", lo=0.0, hi=1.0, lo_open=True)

    def __post_init__(self) -> None:
        if self.train_size and self.fraction < 1.0:
            raise ConfigError("data.train_size and data.fraction both ask for a subset; set only one "
                              "(train_size: 0 or fraction: 1.0 means all)")


@dataclass(frozen=True)
class ValidateConfig:
    max_class_ratio: float = _f(2.0, "per split, the largest class may have at most this many times the "
                                "samples of the smallest (MNIST's is 1.24); more fails prepare", lo=1.0)


@dataclass(frozen=True)
class TeacherConfig:
    arch: str = _f("mlp-1200-1200", "mlp-H1-H2-..., lenet-300-100, lenet5 or vgg-like", pattern=ARCH_PATTERN)
    width: float = _f(1.0, "multiplies every hidden width (vgg-like's width factor)", lo=0.0, hi=MAX_WIDTH,
                       lo_open=True)
    epochs: int = _f(5, "training epochs of the dense teacher", lo=1, hi=MAX_EPOCHS)
    batch_size: int = _f(100, "mini-batch size", lo=1)
    lr: float = _f(1e-3, "Adam learning rate", lo=0.0, hi=1.0, lo_open=True)
    lr_decay_start: float = _f(0.5, "fraction of `epochs` after which lr decays linearly to 0 (1 = never)",
                               lo=0.0, hi=1.0)
    source: str = _f("train", "train | models:/NAME@ALIAS | models:/NAME/VERSION (reuse a registered teacher)",
                     pattern=TEACHER_SOURCE_PATTERN, known="train, models:/NAME@ALIAS, models:/NAME/VERSION")
    nproc: int = _f(1, "processes for data-parallel training (torchrun + DDP; gloo on CPU, nccl on GPU)", lo=1)
    # a regularized teacher is the premise of distillation (Hinton et al. 2015 trained theirs with dropout and
    # jittered inputs): an unregularized MNIST MLP teacher ends no better than its student (docs/results.md)
    dropout: float = _f(0.0, "dropout rate on the input of every layer but the first, while the teacher "
                        "trains; 0 = off", lo=0.0, hi=0.95)
    input_dropout: float = _f(0.0, "dropout rate on the input pixels while the teacher trains; 0 = off",
                              lo=0.0, hi=0.95)
    shift: int = _f(0, "teacher training images are shifted by up to this many pixels each way (random, "
                    "zero fill); 0 = off", lo=0, hi=16)

    def __post_init__(self) -> None:
        _check_hidden_units("teacher.arch", self.arch)


@dataclass(frozen=True)
class StudentConfig:
    arch: str = _f("mlp-500-50", "as teacher.arch; built with sparse variational layers", pattern=ARCH_PATTERN)
    width: float = _f(1.0, "multiplies every hidden width", lo=0.0, hi=MAX_WIDTH, lo_open=True)

    def __post_init__(self) -> None:
        _check_hidden_units("student.arch", self.arch)


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = _f(40, "at most this many epochs; training may stop earlier once converged", lo=1,
                      hi=MAX_EPOCHS)
    batch_size: int = _f(100, "mini-batch size (Molchanov et al. use 100)", lo=1)
    lr: float = _f(1e-3, "Adam learning rate", lo=0.0, hi=1.0, lo_open=True)
    lr_decay_start: float = _f(0.5, "fraction of `epochs` after which lr decays linearly to 0 (1 = never)",
                               lo=0.0, hi=1.0)
    kd_weight: float = _f(0.5, "lambda_T: weight of the teacher hint; 0 = no distillation", lo=0.0,
                          hi=MAX_LOSS_WEIGHT)
    temperature: float = _f(2.0, "T: softening temperature of the hint", lo=0.0, hi=1000.0, lo_open=True)
    kd_direction: str = _f("teacher_student", "KL(teacher||student), the usual KD, or the paper's "
                           "KL(student||teacher)", choices=("teacher_student", "student_teacher"))
    vd_weight: float = _f(1.5, "lambda_V: weight of the variational-dropout KL; 0 = no sparsification",
                          lo=0.0, hi=MAX_LOSS_WEIGHT)
    kl_warmup_epochs: int = _f(5, "beta rises linearly from 0 to 1 over this many epochs", lo=0, hi=MAX_EPOCHS)
    bsr_weight: float = _f(1e-5, "lambda_g: weight of the Block Sparse Regularizer; 0 = off", lo=0.0,
                           hi=MAX_LOSS_WEIGHT)
    bsr_norm: str = _f("linf", "block norm: linf (l1/l_inf, the paper's) or l2 (l1/l2)",
                       choices=("linf", "l2"))
    bsr_blocks: str = _f("out", "blocks are output units (rows/filters) or input units (columns)",
                         choices=("out", "in"))
    converge_tol: float = _f(1e-3, "stop once the relative change of the epoch loss stays below this",
                             lo=0.0)
    patience: int = _f(3, "... for this many consecutive epochs after the KL warm-up", lo=1)
    train_clip: bool = _f(False, "weights whose log alpha reaches prune.threshold are zero in the training "
                          "forward too and get no KL gradient (the reference code's train_clip): the student "
                          "trains as it will be pruned")
    shift: int = _f(0, "student training images are shifted by up to this many pixels each way (random, zero "
                    "fill), the teacher's hint computed on the same shifted batch (a teacher forward per step "
                    "instead of cached logits); 0 = off", lo=0, hi=16)
    mixup: float = _f(0.0, "alpha of mixup's Beta(alpha, alpha): each student training image blended with "
                      "another of its batch, the hint computed on the blend (a teacher forward per step) and "
                      "the label blended alike; 0 = off", lo=0.0, hi=100.0)


@dataclass(frozen=True)
class PruneConfig:
    threshold: float = _f(3.0, "weights with log alpha >= threshold are zero (Molchanov et al.: 3)",
                          lo=-8.0, hi=8.0)


EXPORT_FORMATS = ("compact", "compact_fp16", "compact_bf16", "sparse", "onnx")


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = _f(("compact", "sparse", "onnx"), "exports prune writes and parity-checks "
                                  "(compact.* is always written); predict uses the first", choices=EXPORT_FORMATS)
    sparse_values: str = _f("float32", "values of the sparse export: float32, float16 (half the bytes), or "
                            "quantized (integer codes on a step per layer that keeps the predictions; "
                            "export/quantized.py)",
                            choices=("float32", "float16", "quantized"))
    choose_repeats: int = _f(20, "timed runs per layer when the sparse export picks CSR or dense", lo=1)
    near_tie_margin: float = _f(0.01, "quantized values: training images whose two largest logits differ by less "
                                "than this (near ties) are not held to their prediction when the steps are chosen; "
                                "test images always are; 0 = hold every image", lo=0.0)


@dataclass(frozen=True)
class EvaluateConfig:
    latency_repeats: int = _f(20, "timed repetitions per throughput measurement", lo=1)
    latency_warmup: int = _f(3, "untimed repetitions first", lo=0)
    threads: int = _f(0, "CPU threads for throughput; 0 = torch's default", lo=0)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = _f("auto", "auto picks CUDA when present", choices=("auto", "cpu", "cuda"))
    progress: bool = _f(True, "show progress bars on a terminal")
    deterministic: bool = _f(True, "deterministic kernels (torch.use_deterministic_algorithms): identical reruns "
                             "and resumes on the CPU; on a GPU it costs speed")
    cuda_graphs: bool = _f(True, "on CUDA (one process), replay each training step as one CUDA graph: the small "
                           "networks' steps are bound by kernel launches there")


@dataclass(frozen=True)
class TrainConfig:
    checkpoint_every: int = _f(1, "teacher and distill save a resumable checkpoint every this many epochs; 0 = never",
                               lo=0, hi=100_000)


@dataclass(frozen=True)
class ServicesConfig:
    retries: int = _f(2, "extra connection attempts to a tracking server or database before giving up", lo=0, hi=10)
    timeout_s: float = _f(10.0, "seconds one connection attempt may take", lo=0.0, hi=600.0, lo_open=True)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = _f(True, "log one MLflow run per stage")
    uri: str = _f("sqlite:///mlruns.db", "MLflow tracking URI; sqlite is the embedded default",
                  pattern=TRACKING_URI_PATTERN,
                  known="sqlite:///FILE, http(s)://HOST[:PORT], postgresql://..., mysql://..., mssql://...")
    experiment: str = _f("varstudent", "MLflow experiment name")


# distill settings an Optuna study may search (varstudent/tune.py); the rest of distill is fixed per study
TUNABLE = ("kd_weight", "temperature", "vd_weight", "bsr_weight", "bsr_norm", "lr", "kl_warmup_epochs", "batch_size")
_LOG_TUNABLE = ("kd_weight", "temperature", "vd_weight", "bsr_weight", "lr")


@dataclass(frozen=True)
class TuneConfig:
    study_name: str = _f("varstudent", "Optuna study name; processes sharing storage and name share the work")
    storage: str = _f("auto", "auto = sqlite file OUT/tune/study.db; an RDB URL (postgresql://..., "
                      "sqlite:///...) or a path to a journal file")
    n_trials: int = _f(24, "total trial budget of the study, over all workers and resumes", lo=1)
    sampler: str = _f("nsga2", "nsga2 (NSGA-II), tpe or random", choices=("nsga2", "tpe", "random"))
    population_size: int = _f(8, "NSGA-II generation size (the first generation is random)", lo=2)
    validation_fraction: float = _f(0.2, "share of the TRAINING data held out (stratified) to score trials",
                                    lo=0.0, hi=0.5, lo_open=True)
    fixed: tuple[str, ...] = _f((), "tunable distill keys held at the distill section's value",
                                choices=TUNABLE, allow_empty=True)
    kd_weight: tuple[float, float] = _f((0.0, 2.0), "lambda_T range", lo=0.0)
    temperature: tuple[float, float] = _f((1.0, 8.0), "T range", lo=0.0, lo_open=True)
    vd_weight: tuple[float, float] = _f((0.3, 3.0), "lambda_V range", lo=0.0)
    bsr_weight: tuple[float, float] = _f((1e-7, 1e-3), "lambda_g range", lo=0.0)
    bsr_norm: tuple[str, ...] = _f(("linf", "l2"), "BSR block norms to choose from", choices=("linf", "l2"))
    lr: tuple[float, float] = _f((3e-4, 3e-3), "Adam learning-rate range", lo=0.0, hi=1.0, lo_open=True)
    kl_warmup_epochs: tuple[int, int] = _f((0, 10), "KL warm-up range (epochs)", lo=0)
    # off by default: the search space, and each halving of the batch doubles a trial's steps
    batch_size: tuple[int, ...] = _f((), "mini-batch sizes to choose from; [] = distill.batch_size, not searched",
                                     lo=1, allow_empty=True)
    log_scale: tuple[str, ...] = _f(("temperature", "vd_weight", "bsr_weight", "lr"), "ranges sampled "
                                    "uniformly in log space (low must be > 0)", choices=_LOG_TUNABLE,
                                    allow_empty=True)
    heartbeat_interval: int = _f(10, "seconds between a running trial's heartbeats (RDB storages)", lo=1)
    grace_period: int = _f(60, "a RUNNING trial without a heartbeat this long is failed", lo=2)
    max_accuracy_drop: float = _f(0.5, "accuracy points (%) the chosen trade-off gives up at most against the "
                                  "most accurate Pareto trial (`tune best`, the tuning pipeline)", lo=0.0)

    def __post_init__(self) -> None:
        for name in self.log_scale:
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"tune.{name}: low must be > 0 when sampled in log space (tune.log_scale); "
                                  f"got {getattr(self, name)[0]!r}")
        if self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"tune.grace_period ({self.grace_period}) must exceed tune.heartbeat_interval "
                              f"({self.heartbeat_interval})")


@dataclass(frozen=True)
class KfpConfig:
    """How the Kubeflow pipeline is built (compile time; not pipeline parameters)."""
    image: str = _f("ghcr.io/varstudent/varstudent:0.1.0-cpu", "the project image every component runs in "
                    "(infra/Dockerfile.cpu or .cuda, pushed where the cluster can pull it)")
    accelerator_type: str = _f("nvidia.com/gpu", "accelerator resource the training tasks request")
    accelerator_count: int = _f(1, "accelerators per training task; 0 = none (CPU-only cluster)", lo=0)
    cpu_request: str = _f("2", "CPU request of the training tasks (Kubernetes quantity)")
    memory_request: str = _f("8Gi", "memory request of the training tasks (Kubernetes quantity)")
    gpu_taint: str = _f("nvidia.com/gpu", "key of the NoSchedule taint on GPU nodes; training tasks tolerate it")
    retries: int = _f(2, "retries of a failed training task (preempted or flaky nodes)", lo=0, hi=10)
    pipeline_root: str = _f("artifacts/kfp", "where `pipeline run --local` keeps every task's outputs")
    tune_workers: int = _f(4, "parallel tune_worker tasks of the tuning pipeline (fixed when compiled)", lo=1,
                           hi=64)
    storage_secret: str = _f("none", "Kubernetes Secret whose `password` key becomes PGPASSWORD of the tuning "
                             "pipeline's study tasks (keeps the password out of tune.storage); none = no Secret")


@dataclass(frozen=True)
class RegisterConfig:
    max_accuracy_drop: float = _f(0.01, "the student may be at most this much less accurate than its teacher "
                                  "(a fraction: 0.01 = one point)", lo=0.0, hi=1.0)
    min_compression: float = _f(10.0, "teacher weights / nonzero weights of the compact student, at least",
                                lo=1.0)
    champion_rule: str = _f("balanced", "how a candidate beats the champion on the same test set: balanced = "
                            "not less accurate by more than `tolerance` and at least as compressed, or strictly "
                            "better on both; accuracy = more accurate by more than `tolerance`, or as accurate "
                            "within it and more compressed; compression = more compressed and not less accurate "
                            "by more than `tolerance`", choices=("balanced", "accuracy", "compression"))
    tolerance: float = _f(0.002, "accuracy tolerance of the champion rule (a fraction)", lo=0.0, hi=1.0)
    lock_lease_s: int = _f(600, "a registration lock older than this is taken as abandoned", lo=10)


@dataclass(frozen=True)
class Params:
    seed: int = _f(0, "seeds torch, numpy and data splits", lo=0, hi=2**32 - 1)  # numpy's seed range
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    kfp: KfpConfig = field(default_factory=KfpConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (tuples become lists), as YAML, JSON and MLflow want them."""
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return list(value) if isinstance(value, tuple) else value

        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """A params file that `--params` reads back to the same settings (sections in their declared order)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the effective settings, for lineage tags."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_choices(name: str, f: dataclasses.Field, value: Any) -> tuple[str, ...]:
    """A list of names from the field's choices: no repeats, at least one."""
    choices = f.metadata["choices"]
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and not value and f.metadata.get("allow_empty"):
        return ()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: expected a non-empty list of names from {', '.join(choices)}; got {value!r}")
    unknown = [v for v in value if v not in choices]
    if unknown:
        raise ConfigError(f"{name}: unknown name {unknown[0]!r} (known: {', '.join(choices)})")
    return _no_repeats(name, tuple(value))


def _no_repeats(name: str, items: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(items)) != len(items):
        raise ConfigError(f"{name}: {sorted(v for v in set(items) if items.count(v) > 1)[0]!r} is listed twice")
    return items


def _check_int_choices(name: str, f: dataclasses.Field, value: Any) -> tuple[int, ...]:
    """A list of distinct integers, each within the field's bounds; empty only with allow_empty."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple)) and not value and f.metadata.get("allow_empty"):
        return ()
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{name}: expected a list of integers such as [50, 100], got {value!r}")
    return _no_repeats(name, tuple(_check_value(name, f, int, v) for v in value))


def _check_range(name: str, f: dataclasses.Field, typ: Any, value: Any) -> tuple[Any, Any]:
    """A [low, high] pair of numbers (integers for tuple[int, int]), each within the field's bounds."""
    item = typ.__args__[0]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{name}: expected [low, high], got {value!r}")
    low, high = (_check_value(name, f, item, v) for v in value)
    if low > high:
        raise ConfigError(f"{name}: low {low!r} is above high {high!r}")
    return low, high


def _check_value(name: str, f: dataclasses.Field, typ: Any, value: Any) -> Any:
    if typ == tuple[str, ...]:
        return _check_choices(name, f, value)
    if typ == tuple[int, ...]:
        return _check_int_choices(name, f, value)
    if typ in (tuple[float, float], tuple[int, int]):
        return _check_range(name, f, typ, value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            value = float(value)  # YAML 1.1 reads 1e6 (no dot) as a string; it is a number to anyone else
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    elif typ is str:
        if isinstance(value, dict) and len(value) == 1 and None in value.values():  # YAML read `dir:` as a key
            raise ConfigError(f"{name}: expected a string, got {next(iter(value))}: with nothing after the "
                              "colon (e.g. dir:PATH needs its PATH)")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `--set kfp.cpu_request=2` reads as YAML's integer 2: the string was meant
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: must be one of {', '.join(meta['choices'])}; got {value!r}")
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        known = meta.get("known") or \
            meta["pattern"].replace("(-\\d+)+", "-H1-H2-...").replace("|", ", ").replace(":.+", ":PATH")
        raise ConfigError(f"{name}: unknown name {value!r} (known: {known})")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        raise ConfigError(f"{name}: must be {bound}; got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}: must be <= {hi}; got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key '{where}{unknown[0]}' (known in {prefix or 'top level'}: "
                          f"{', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        full = f"{prefix}.{name}" if prefix else name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, value if value is not None else {}, full)
        else:
            values[name] = _check_value(full, fields[name], typ, value)
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'distill.kd_weight=0.5' -> (['distill', 'kd_weight'], 0.5); the value is read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        if value.strip().startswith(("[", "{")):  # meant as a list or mapping: say why it is not one
            problem = getattr(exc, "problem", None) or "unreadable"
            raise ConfigError(f"--set {text}: not valid YAML ({problem})") from None
        parsed = value  # e.g. a path with a colon: the setting's own check decides
    return key.strip().split("."), parsed


def _unique_keys_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error: plain YAML keeps the last,
    so a second `distill:` section would silently drop the first whole."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: list = []
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.append(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def load_params(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read params.yaml (or the defaults when path is None), apply --set overrides, validate."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        try:
            loader = _unique_keys_loader()(path.read_text(encoding="utf-8"))  # a SafeLoader: no object tags
            try:
                loaded = loader.get_single_data()
            finally:
                loader.dispose()
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file (a params file is YAML)") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or ""
            detail = f": {problem}" if problem.startswith("duplicate key") else ""
            raise ConfigError(f"{path}: not valid YAML{where}{detail}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{k}' is not a section")
        node[keys[-1]] = value
    return _build(Params, raw, "")

