"""The MLflow model registry at the edge: teacher and student versions, the champion gate, lineage.

Models are logged as an MLflow pyfunc *from code* (varstudent/mlflow_model.py) whose artifact is the
safetensors + JSON pair: nothing is pickled. Each version carries the tags `lineage` prints.

Race safety: moving `champion` (read the champion, score it, compare, set the alias) runs under a lock that
lives in the store itself: a registered model named `<model>.register-lock`, created to take the lock and
deleted to release it. Creating a registered model is atomic in every MLflow store (its name is the primary
key), so this works for the local sqlite store and for a tracking server with any database behind it. Limits:
a process killed while holding the lock leaves it behind until it is `register.lock_lease_s` old (then the next
registration removes it); a registration slower than the lease could overlap another one; the lock shows in
the registry's model list while held.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from varstudent.config import Params
from varstudent.errors import ArtifactError, ConfigError, ServiceError
from varstudent.tracking import TAG, connect, lineage_tags, read_record, service_errors

TEACHER_MODEL = "varstudent-teacher"
STUDENT_MODEL = "varstudent-student"
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
STAGES = ("prepare", "teacher", "distill", "prune", "evaluate", "register")


def pip_requirements() -> list[str]:
    """Pinned from what is installed; explicit, so logging does not spend seconds inferring them."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("mlflow", "torch", "safetensors", "numpy", "pandas")]


def example_inputs(data_dir: Path, n: int = 5) -> np.ndarray:
    """The first test images as float32 in [0, 1], the model's input example (read alone: the stage that just
    ran has checked the file; loading and hashing all of MNIST again would cost a second)."""
    from safetensors import safe_open

    from varstudent.data.prepared import DATA_FILE

    with safe_open(str(data_dir / DATA_FILE), framework="numpy") as tensors:
        return tensors.get_slice("x_test")[:n].astype(np.float32) / np.float32(255.0)


@contextmanager
def _no_requirement_check() -> Iterator[None]:
    """mlflow checks the pinned requirements against the installed packages, when saving and again when it
    loads the model to validate the input example, by scanning every installed distribution (1-5 s, once per
    process). Ours are read from the installed versions, so the check cannot fail: skip it while logging.
    Patches only names that exist (a later mlflow that renames them just runs its check)."""
    import mlflow.pyfunc
    import mlflow.utils.environment

    name = "warn_dependency_requirement_mismatches"
    patched = [(module, getattr(module, name)) for module in (mlflow.utils.environment, mlflow.pyfunc)
               if hasattr(module, name)]
    for module, _ in patched:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for module, original in patched:
            setattr(module, name, original)


def log_pyfunc(model_dir: Path, name: str, x_example: np.ndarray, registered_name: str,
               tags: dict[str, str]) -> Any:
    """Log NAME.{json,safetensors} as a pyfunc into the active run and register it; the new ModelVersion."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from varstudent.artifacts import load_model
    from varstudent.predict import class_table

    net = load_model(model_dir, name)
    with warnings.catch_warnings():  # the int64 `class` column: a hint about missing values, which it never has
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(x_example, class_table(net, torch.from_numpy(x_example)))
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".json", ".safetensors"):
            shutil.copy2(model_dir / f"{name}{suffix}", tmp)
        with _no_requirement_check():
            info = mlflow.pyfunc.log_model(name=name, python_model=str(MODEL_CODE), artifacts={"model": tmp},
                                           model_config={"name": name}, signature=signature,
                                           input_example=x_example, pip_requirements=pip_requirements(),
                                           registered_model_name=registered_name)
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return client.get_model_version(registered_name, version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS, models:/NAME/VERSION or NAME@ALIAS -> (name, alias, version)."""
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    raise ConfigError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def get_version(client: Any, uri: str) -> Any:
    """The ModelVersion a models:/ reference names, or a clear error."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ArtifactError(_not_found(client, uri, name, alias, version)) from None
        raise


def _not_found(client: Any, uri: str, name: str, alias: str | None, version: str | None) -> str:
    """Which part of a models:/ reference the store lacks: the model, or only that alias or version of it."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return f"no registered model {uri} in {client.tracking_uri}"
    if alias:
        aliases = ", ".join(sorted(model.aliases or {})) or "none"
        return f"{uri}: the registered model {name} has no alias {alias!r} (its aliases: {aliases})"
    return f"{uri}: the registered model {name} has no version {version}"


def download_model(client: Any, version: Any, name: str, dest: Path) -> Path:
    """Copy the version's NAME.{json,safetensors} into dest (checked when loaded); dest."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                         dst_path=tmp))
        found = sorted(local.rglob(f"{name}.safetensors"))
        if not found:
            raise ArtifactError(f"models:/{version.name}/{version.version} holds no {name}.safetensors "
                                f"(not a varstudent model?)")
        dest.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".safetensors"):
            shutil.copy2(found[0].with_suffix(suffix), dest / f"{name}{suffix}")
    return dest


def fetch_teacher(params: Params, out_dir: Path) -> dict[str, str]:
    """teacher.source = models:/...: copy that registered teacher into out_dir (the teacher stage's output)."""
    if not params.tracking.enabled:
        raise ConfigError(f"teacher.source: {params.teacher.source} needs tracking.enabled: true")
    uri = params.teacher.source
    with service_errors(params.tracking.uri, f"fetching {uri}"):
        client = connect(params)
        version = get_version(client, uri)
        download_model(client, version, "teacher", out_dir)
    return {"teacher_source": uri, "teacher_model_name": version.name, "teacher_model_version": str(version.version),
            "teacher_run_id": version.run_id or ""}


def record_teacher(client: Any, run_id: str, params: Params, dirs: dict[str, Path],
                   metrics: dict[str, Any]) -> dict[str, Any]:
    """After the teacher stage: register a trained teacher (or note the reused one); the run record's extra."""
    import mlflow

    if metrics.get("teacher_model_version"):  # reused, not retrained: no new version
        return {"model_name": metrics["teacher_model_name"], "model_version": metrics["teacher_model_version"],
                "source_run_id": metrics.get("teacher_run_id", "")}
    from varstudent.artifacts import read_json

    manifest = read_json(dirs["prepare"] / "manifest.json", "prepared-data manifest")
    tags = {**lineage_tags(params, manifest["sha256"][:16]), f"{TAG}accuracy": f"{metrics['teacher_accuracy']:.6f}",
            f"{TAG}weights": str(metrics["teacher_weights"]), f"{TAG}run.teacher": run_id,
            f"{TAG}bytes": str((dirs["teacher"] / "teacher.safetensors").stat().st_size)}
    prepare = read_record(dirs["prepare"])
    if prepare:
        tags[f"{TAG}run.prepare"] = prepare["run_id"]
    with mlflow.start_run(run_id=run_id):
        version = log_pyfunc(dirs["teacher"], "teacher", example_inputs(dirs["prepare"]), TEACHER_MODEL, tags)
    _promote_teacher(client, version, metrics["teacher_accuracy"], manifest["sha256"][:16])
    return {"model_name": TEACHER_MODEL, "model_version": str(version.version)}


def _promote_teacher(client: Any, version: Any, accuracy: float, dataset_digest: str) -> None:
    """The first teacher, or one more accurate on the same data than the champion, becomes the champion."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(TEACHER_MODEL, CHAMPION)
    except MlflowException:
        current = None
    if current is None or (current.tags.get(f"{TAG}dataset_digest") == dataset_digest
                           and accuracy > float(current.tags.get(f"{TAG}accuracy", "0"))):
        client.set_registered_model_alias(TEACHER_MODEL, CHAMPION, version.version)


@contextmanager
def registry_lock(client: Any, model: str, lease_s: float, wait_s: float = 300) -> Iterator[None]:
    """Exclusive across processes and machines sharing the store (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    lock, deadline = f"{model}.register-lock", time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, description="held by a running `varstudent register`")
            break
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                # MLflow's sqlite store answers a duplicate name by reading the existing model to word its error;
                # when the holder released the lock in between, that read fails with "not found": try again
                continue
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
            if time.time() * 1000 - held.creation_timestamp > lease_s * 1000:  # abandoned by a killed process
                client.delete_registered_model(lock)
                continue
        except MlflowException:
            continue  # released meanwhile
        if time.monotonic() > deadline:
            raise ServiceError(f"the registry lock {lock} in {client.tracking_uri} is still held after "
                               f"{wait_s:.0f} s (another registration running?)")
        time.sleep(0.1 + 0.2 * random.random())
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _champion_scores(client: Any, x_test: Any, y_test: Any) -> tuple[Any, Any]:
    """(the champion version or None, its Scores on this test set)."""
    from mlflow.exceptions import MlflowException

    from varstudent.artifacts import load_model
    from varstudent.gate import Scores
    from varstudent.train import accuracy

    try:
        champion = client.get_model_version_by_alias(STUDENT_MODEL, CHAMPION)
    except MlflowException:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        net = load_model(download_model(client, champion, "compact", Path(tmp)), "compact")
    if tuple(net.spec["input_shape"]) != tuple(x_test.shape[1:]):
        # a champion for other inputs cannot be compared on this test set: it scores 0, so it is replaced
        return champion, Scores(0.0, float(champion.tags.get(f"{TAG}compression", "0")))
    return champion, Scores(accuracy(net, x_test, y_test), float(champion.tags.get(f"{TAG}compression", "0")))


def register_student(params: Params, dirs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    """Register the compact student; move `champion` to it only if it passes the gate, else `challenger`."""
    import mlflow

    from varstudent.artifacts import load_model
    from varstudent.data import load_prepared
    from varstudent.fileio import write_json
    from varstudent.gate import Scores, failed_rule
    from varstudent.nn.architectures import weight_count
    from varstudent.prune import nonzero_weights
    from varstudent.train import accuracy

    require_tracking(params)
    if not (dirs["prune"] / "compact.json").is_file():
        raise ArtifactError(f"no compact student in {dirs['prune']}: run `varstudent prune` first")
    data = load_prepared(dirs["prepare"])
    x, y = data.x_test, data.y_test
    compact, teacher = load_model(dirs["prune"], "compact"), load_model(dirs["teacher"], "teacher")
    nonzero = nonzero_weights(compact)
    candidate = Scores(accuracy(compact, x, y), weight_count(teacher.spec) / max(nonzero, 1))
    teacher_accuracy = accuracy(teacher, x, y)
    digest = data.manifest["sha256"][:16]
    teacher_record = read_record(dirs["teacher"]) or {}
    # full precision: the gate compares these with the next candidate's
    tags = {**lineage_tags(params, digest), f"{TAG}accuracy": str(candidate.accuracy),
            f"{TAG}compression": str(candidate.compression), f"{TAG}nonzero_weights": str(nonzero),
            f"{TAG}bytes": str((dirs["prune"] / "compact.safetensors").stat().st_size),
            f"{TAG}teacher_accuracy": f"{teacher_accuracy:.6f}",
            f"{TAG}teacher_version": str(teacher_record.get("model_version", "unknown")),
            f"{TAG}teacher_model": str(teacher_record.get("model_name", TEACHER_MODEL))}
    for stage in STAGES[:-1]:
        record = read_record(dirs[stage])
        if record:
            tags[f"{TAG}run.{stage}"] = record["run_id"]
    with service_errors(params.tracking.uri, "registering the student"):
        client = connect(params)
        own_run = mlflow.active_run() is None  # called outside the CLI's tracker (a KFP task, a test)
        run = mlflow.active_run() or mlflow.start_run(run_name="register", tags=tags)
        tags[f"{TAG}run.register"] = run.info.run_id
        try:
            version = log_pyfunc(dirs["prune"], "compact", x[:5].numpy(), STUDENT_MODEL, tags)
        finally:
            if own_run:
                mlflow.end_run()
        with registry_lock(client, STUDENT_MODEL, params.register.lock_lease_s):
            champion, champion_scores = _champion_scores(client, x, y)
            reason = failed_rule(candidate, teacher_accuracy, champion_scores, params.register)
            alias = CHALLENGER if reason else CHAMPION
            client.set_registered_model_alias(STUDENT_MODEL, alias, version.version)
        client.set_model_version_tag(STUDENT_MODEL, version.version, f"{TAG}gate", reason or "passed")
        if champion is not None:
            client.set_model_version_tag(STUDENT_MODEL, version.version, f"{TAG}compared_with_version",
                                         str(champion.version))
    decision = {"model": STUDENT_MODEL, "version": str(version.version), "alias": alias, "failed_rule": reason,
                "accuracy": candidate.accuracy, "compression": candidate.compression,
                "teacher_accuracy": teacher_accuracy, "previous_champion": champion and str(champion.version),
                "previous_champion_accuracy": champion_scores and champion_scores.accuracy}
    write_json(out_dir / "decision.json", decision)
    return decision


def require_tracking(params: Params) -> None:
    if not params.tracking.enabled:
        raise ConfigError("register needs tracking.enabled: true (it writes to the MLflow model registry)")


def lineage(params: Params, reference: str) -> dict[str, Any]:
    """Everything recorded about one registered version: tags, the params of its run, each stage's run."""
    uri = reference if reference.startswith("models:/") else f"models:/{reference}"
    from varstudent.services import sqlite_file

    store = sqlite_file(params.tracking.uri)
    if store is not None and not store.is_file():  # connecting would create an empty store in its place
        raise ConfigError(f"no MLflow store at {store}: nothing is registered there (check tracking.uri)")
    with service_errors(params.tracking.uri, f"reading {uri}"):
        client = connect(params)
        version = get_version(client, uri)
        tags = version.tags
        runs = {}
        for stage in STAGES:
            run_id = tags.get(f"{TAG}run.{stage}")
            if run_id:
                run = client.get_run(run_id)
                runs[stage] = {"run_id": run_id, "status": run.info.status, "start_time": run.info.start_time,
                               "parent_run_id": run.data.tags.get("mlflow.parentRunId")}
        params = client.get_run(version.run_id).data.params if version.run_id else {}
        aliases = list(version.aliases)
    return {"model": version.name, "version": str(version.version), "aliases": aliases,
            "dataset_digest": tags.get(f"{TAG}dataset_digest", "unknown"),
            "git_commit": tags.get(f"{TAG}git_commit", "unknown"),
            "params_digest": tags.get(f"{TAG}params_digest", "unknown"),
            "kfp_run_id": tags.get(f"{TAG}kfp_run_id"),
            "teacher_version": tags.get(f"{TAG}teacher_version"),
            "accuracy": tags.get(f"{TAG}accuracy"), "compression": tags.get(f"{TAG}compression"),
            "bytes": tags.get(f"{TAG}bytes"), "gate": tags.get(f"{TAG}gate"),
            "params": dict(sorted(params.items())), "runs": runs}
