"""The bad-input catalogue: every way a user, a disk or a server can hand the pipeline something wrong.

Each case runs a CLI command and must end in ONE `varstudent: error:` line that names the problem, exit
code 1, no Python traceback, and leave the artifacts as they were (no partial output a later stage could
read). Most cases call the console script's `main()` in this process (the same code path, much faster
than a new interpreter per case); the service and disk cases run a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_clean_error, cli, forge_json

TINY = ["data.dataset=digits", "tracking.enabled=false", "teacher.arch=mlp-64-64", "teacher.epochs=1",
        "student.arch=mlp-32-16", "distill.epochs=1", "runtime.progress=false", "export.formats=[compact,sparse]"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in [*TINY, *overrides] for arg in ("--set", o)]


@pytest.fixture(scope="module")
def finished(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT/ after prepare, teacher, distill and prune on digits; each case damages its own copy."""
    from varstudent import stages
    from varstudent.config import load_params

    out = tmp_path_factory.mktemp("finished")
    params = load_params(None, TINY)
    shutil.copytree(digits_dir, out / "prepare")
    stages.teacher(params, out / "prepare", out / "teacher")
    stages.distill(params, out / "prepare", out / "teacher", out / "distill")
    stages.prune(params, out / "prepare", out / "distill", out / "prune")
    return out


def test_prune_selects_quantized_steps_on_the_training_and_test_images(finished: Path, tmp_path: Path) -> None:
    # not a bad input: it reuses this module's finished run (the prune stage with export.sparse_values=quantized)
    from varstudent import stages
    from varstudent.config import load_params

    params = load_params(None, [*TINY, "export.sparse_values=quantized"])
    metrics = stages.prune(params, finished / "prepare", finished / "distill", tmp_path / "prune")
    doc = json.loads((tmp_path / "prune" / "sparse.json").read_text())
    selected = doc["quantized"]
    assert selected["tie_margins"] == [params.export.near_tie_margin, 0.0]  # digits' training, then test images
    assert doc["values_dtype"] == "quantized"
    assert selected["selection_samples"] == 1437 + 360 - selected["ties_left_out"]
    exports = json.loads((tmp_path / "prune" / "exports.json").read_text())["exports"]
    assert exports["sparse"]["differing_predictions"] == 0 and exports["sparse"]["precision"] == "quantized"
    float32_bytes = sum(p.stat().st_size for p in (finished / "prune").glob("sparse.*"))
    assert metrics["export_sparse_bytes"] < float32_bytes


@contextmanager
def _closed_port() -> Iterator[int]:
    """A loopback port nothing listens on: held bound, never listening, so connecting is refused and no other
    process (a parallel test's server) can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _flip_byte(path: Path, where: float = 0.5) -> None:
    blob = bytearray(path.read_bytes())
    blob[int(len(blob) * where)] ^= 0xFF
    path.write_bytes(bytes(blob))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    forge_json(path, change)


def _hand_edit_json(path: Path, change: Callable[[dict], None]) -> None:
    """An edit without signing the pair again (the format version is checked before the digests)."""
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _resave_safetensors(path: Path, spec: Path, change: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file with changed tensors and a matching sha256 in its JSON (a consistent lie)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    _edit_json(spec, lambda d: d.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


def _prepared_of_other_shape(out: Path) -> None:
    from varstudent.data import write_prepared

    rng = np.random.default_rng(0)
    shutil.rmtree(out / "prepare")
    write_prepared(out / "prepare", "dir:other", rng.integers(0, 255, (40, 1, 6, 6), dtype=np.uint8),
                   np.arange(40) % 10, rng.integers(0, 255, (20, 1, 6, 6), dtype=np.uint8), np.arange(20) % 10,
                   list(range(10)))


def _set_meta(spec: str, key: str, value: str) -> Setup:
    """Damage: the artifact OUT/`spec` records another source in meta[key], as a stage rerun upstream leaves its
    old downstream outputs: saved again through the library, so that only the lineage is off."""
    from varstudent.artifacts import load_model, save_model

    def change(out: Path) -> None:
        directory, name = (out / spec).parent, Path(spec).stem
        meta = json.loads((out / spec).read_text())["meta"]
        save_model(load_model(directory, name), directory, name, meta={**meta, key: value})
    return _damage(change)


# (id, command, extra --set overrides, setup(out, tmp) -> extra CLI args, fragments of the error line)
Setup = Callable[[Path, Path], list[str]]
NONE: Setup = lambda out, tmp: []  # noqa: E731


def _params_file(text: str) -> Setup:
    def setup(out: Path, tmp: Path) -> list[str]:
        (tmp / "bad.yaml").write_text(text)
        return ["--params", str(tmp / "bad.yaml")]
    return setup


def _damage(change: Callable[[Path], None]) -> Setup:
    def setup(out: Path, tmp: Path) -> list[str]:
        change(out)
        return []
    return setup


CASES: list[tuple[str, str, list[str], Setup, tuple[str, ...]]] = [
    # --- params
    ("unknown-key", "teacher", ["distill.kd_wieght=1"], NONE, ("unknown key 'distill.kd_wieght'",)),
    ("unknown-section", "teacher", ["nosuch.key=1"], NONE, ("unknown key 'nosuch'",)),
    ("int-as-word", "teacher", ["teacher.epochs=ten"], NONE, ("teacher.epochs: expected an integer",)),
    ("bool-as-word", "teacher", ["runtime.deterministic=maybe"], NONE,
     ("runtime.deterministic: expected true or false",)),
    ("float-for-int", "teacher", ["train.checkpoint_every=1.5"], NONE,
     ("train.checkpoint_every: expected an integer",)),
    ("negative-lr", "teacher", ["teacher.lr=-0.001"], NONE, ("teacher.lr: must be > 0.0",)),
    ("negative-checkpoint-every", "teacher", ["train.checkpoint_every=-1"], NONE,
     ("train.checkpoint_every: must be >= 0",)),
    ("zero-batch", "teacher", ["teacher.batch_size=0"], NONE, ("teacher.batch_size: must be >= 1",)),
    ("dropout-of-one", "teacher", ["teacher.dropout=1"], NONE, ("teacher.dropout: must be <= 0.95",)),
    ("negative-input-dropout", "teacher", ["teacher.input_dropout=-0.1"], NONE,
     ("teacher.input_dropout: must be >= 0.0",)),
    ("negative-shift", "distill", ["distill.shift=-1"], NONE, ("distill.shift: must be >= 0",)),
    ("negative-mixup", "distill", ["distill.mixup=-0.5"], NONE, ("distill.mixup: must be >= 0",)),
    ("train-clip-as-word", "distill", ["distill.train_clip=maybe"], NONE,
     ("distill.train_clip: expected true or false",)),
    ("shift-beyond-the-image", "teacher", ["teacher.shift=4"], NONE,
     ("teacher.shift 4 moves 8x8 images", "use at most 3")),
    ("student-shift-beyond-the-image", "distill", ["distill.shift=5"], NONE,
     ("distill.shift 5 moves 8x8 images", "use at most 3")),
    ("absurd-width", "distill", ["student.width=1e6"], NONE, ("student.width: must be <= 64.0",)),
    ("absurd-epochs", "distill", ["distill.epochs=100000000"], NONE, ("distill.epochs: must be <= 100000",)),
    ("absurd-loss-weight", "distill", ["distill.vd_weight=1e300"], NONE, ("distill.vd_weight: must be <= 1000000.0",)),
    ("nan-weight", "distill", ["distill.kd_weight=.nan"], NONE, ("distill.kd_weight: expected a finite number",)),
    ("seed-beyond-numpy", "teacher", ["seed=4294967296"], NONE, ("seed: must be <= 4294967295",)),
    ("unknown-choice", "distill", ["distill.kd_direction=sideways"], NONE,
     ("distill.kd_direction: must be one of teacher_student, student_teacher",)),
    ("zero-timeout", "teacher", ["services.timeout_s=0"], NONE, ("services.timeout_s: must be > 0.0",)),
    ("section-as-scalar", "teacher", ["distill=3"], NONE, ("distill: expected a mapping",)),
    ("params-not-yaml", "teacher", [], _params_file("teacher: [unclosed\n"), ("not valid YAML",)),
    ("params-a-list", "teacher", [], _params_file("- teacher\n- distill\n"), ("expected a mapping of sections",)),
    ("params-not-utf8", "teacher", [], lambda out, tmp: ["--params", str(_write_bytes(tmp / "bin.yaml", b"\xff\xfe"))],
     ("bin.yaml: not a UTF-8 text file",)),
    ("tracking-uri-file-store", "teacher", ["tracking.uri=file:///tmp/mlruns"], NONE,
     ("tracking.uri: unknown name 'file:///tmp/mlruns'", "sqlite:///FILE")),
    ("tracking-uri-no-scheme", "teacher", ["tracking.uri=bogus"], NONE, ("tracking.uri: unknown name 'bogus'",)),
    ("arch-zero-units", "teacher", ["teacher.arch=mlp-0-10"], NONE,
     ("teacher.arch: hidden layer sizes must be 1..16384; got 0",)),
    ("arch-absurd-units", "distill", ["student.arch=mlp-100000000-10"], NONE,
     ("student.arch: hidden layer sizes must be 1..16384; got 100000000",)),
    ("dataset-dir-without-path", "prepare", ["data.dataset=dir:"], NONE, ("data.dataset", "dir:PATH needs its PATH")),
    ("params-missing", "teacher", [], lambda out, tmp: ["--params", str(tmp / "nope.yaml")],
     ("params file not found",)),
    ("bsr-depth-mismatch", "distill", ["student.arch=mlp-16", "distill.bsr_weight=0.001"], NONE,
     ("BSR pairs layers by depth", "linear-linear-linear", "linear-linear)", "distill.bsr_weight=0")),
    ("student-not-smaller", "distill", ["student.arch=mlp-128"], NONE,
     ("must have fewer weights than the teacher",)),
    ("arch-needs-larger-inputs", "distill", ["student.arch=lenet5"], NONE,
     ("architecture lenet5 needs larger inputs than 8x8",)),
    # --- data
    ("no-prepared-data", "teacher", [], _damage(lambda out: shutil.rmtree(out / "prepare")),
     ("no prepared data; run `varstudent prepare` first",)),
    ("data-file-missing", "teacher", [], _damage(lambda out: (out / "prepare/data.safetensors").unlink()),
     ("data.safetensors: missing",)),
    ("data-corrupt", "teacher", [], _damage(lambda out: _flip_byte(out / "prepare/data.safetensors")),
     ("data.safetensors: sha256 does not match manifest.json",)),
    ("data-truncated", "teacher", [], _damage(lambda out: _truncate(out / "prepare/data.safetensors")),
     ("data.safetensors: sha256 does not match manifest.json",)),
    ("manifest-not-json", "teacher", [], _damage(lambda out: (out / "prepare/manifest.json").write_text("{oops")),
     ("manifest.json: unreadable manifest",)),
    ("manifest-version", "teacher", [],
     _damage(lambda out: _edit_json(out / "prepare/manifest.json", lambda d: d.update(format_version=99))),
     ("format_version 99, expected 1",)),
    ("data-wrong-shape", "teacher", [], _damage(lambda out: _resave_safetensors(
        out / "prepare/data.safetensors", out / "prepare/manifest.json",
        lambda t: t.update(x_train=t["x_train"][:, :, :4, :]))),
     ("x_train should be uint8 (1437, 1, 8, 8) per the manifest, got uint8 (1437, 1, 4, 8)",)),
    ("labels-out-of-range", "teacher", [], _damage(lambda out: _resave_safetensors(
        out / "prepare/data.safetensors", out / "prepare/manifest.json",
        lambda t: t.update(y_train=t["y_train"] + 5))),
     ("y_train has labels outside the classes 0..9",)),
    ("teacher-for-other-inputs", "distill", [], _damage(_prepared_of_other_shape),
     ("was trained on inputs of shape [1, 8, 8], the data has [1, 6, 6]",)),
    ("data-settings-differ", "teacher", ["data.dataset=mnist5k"], NONE,
     ("the prepared data in", "was made with data.dataset=digits", "the settings say data.dataset=mnist5k",
      "run `varstudent prepare` with them first")),
    ("seed-of-a-drawn-split-differs", "distill", ["seed=5"], NONE, ("was made with seed=0; the settings say seed=5",)),
    ("dataset-folder-missing", "prepare", [], lambda out, tmp: ["--set", f"data.dataset=dir:{tmp}/no-such-folder"],
     ("no-such-folder",)),
    # --- artifacts
    ("teacher-from-other-data", "distill", [], _set_meta("teacher/teacher.json", "data_sha256", "0" * 64),
     ("the teacher in", "was trained on other prepared data than the current one",
      "run `varstudent teacher` again")),
    ("student-from-other-data", "prune", [], _set_meta("distill/student.json", "data_sha256", "0" * 64),
     ("the student in", "was distilled on other prepared data", "run `varstudent distill` again")),
    ("student-from-other-teacher", "evaluate", [], _set_meta("distill/student.json", "teacher_sha256", "0" * 64),
     ("the student in", "was distilled from another teacher", "run `varstudent distill` again")),
    ("compact-from-other-student", "evaluate", [], _set_meta("prune/compact.json", "student_sha256", "f" * 64),
     ("the compact student in", "was pruned from another student", "run `varstudent prune` again")),
    ("no-teacher", "distill", [], _damage(lambda out: shutil.rmtree(out / "teacher")),
     ("no teacher found", "run `varstudent teacher` first")),
    ("teacher-weights-missing", "distill", [], _damage(lambda out: (out / "teacher/teacher.safetensors").unlink()),
     ("teacher.safetensors", "not found")),
    ("teacher-truncated", "distill", [], _damage(lambda out: _truncate(out / "teacher/teacher.safetensors")),
     ("teacher.safetensors: checksum does not match its spec",)),
    ("student-tampered", "prune", [], _damage(lambda out: _flip_byte(out / "distill/student.safetensors", 0.9)),
     ("student.safetensors: checksum does not match its spec",)),
    ("spec-not-matching-weights", "distill", [], _damage(lambda out: _edit_json(
        out / "teacher/teacher.json", lambda d: d["spec"]["layers"][0].update(out=65))),
     ("teacher.safetensors: tensor", "the spec says")),
    ("spec-not-json", "prune", [], _damage(lambda out: (out / "distill/student.json").write_text("not json")),
     ("student.json", "is not valid JSON")),
    ("student-for-other-inputs", "prune", [], _damage(lambda out: _edit_json(
        out / "distill/student.json", lambda d: d["spec"].update(input_shape=[1, 64, 1]))),
     ("the student in", "takes inputs of shape [1, 64, 1], the prepared data has [1, 8, 8]",)),
    ("spec-other-format", "evaluate", [], _damage(lambda out: _hand_edit_json(
        out / "teacher/teacher.json", lambda d: d.update(format_version=7))),
     ("not a varstudent model spec",)),
    ("weights-unparsable", "prune", [], _damage(lambda out: (
        (out / "distill/student.safetensors").write_bytes(b"\xff" * 64),
        _hand_edit_json(out / "distill/student.json",
                        lambda d: d.update(sha256=hashlib.sha256(b"\xff" * 64).hexdigest())))),
     ("student.safetensors: unreadable safetensors file",)),
    ("teacher-weights-nan", "distill", [], _damage(lambda out: _resave_safetensors(
        out / "teacher/teacher.safetensors", out / "teacher/teacher.json",
        lambda t: t.update({k: np.full_like(v, np.nan) for k, v in t.items() if k.endswith("weight")}))),
     ("distill: loss is nan at epoch 1, batch 1 (non-finite term: KD, BSR)",)),
    ("distill-metrics-not-an-object", "evaluate", [],
     _damage(lambda out: (out / "distill/metrics.json").write_text("[]")),
     ("distill metrics is not an object but list",)),
    ("no-student", "prune", [], _damage(lambda out: shutil.rmtree(out / "distill")),
     ("no student found", "run `varstudent distill` first")),
    ("no-compact", "evaluate", [], _damage(lambda out: shutil.rmtree(out / "prune")), ("compact", "not found")),
    ("out-is-a-file", "teacher", [], lambda out, tmp: ["--out", str(_touch(tmp / "a-file"))],
     ("is a file, not a folder",)),
]


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file a later stage could read (the lock file and checkpoints are not outputs)."""
    if not out.is_dir():
        return {}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".varstudent.lock" and "checkpoints" not in p.parts}


def run_main(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """`varstudent ARGS` through the console script's main(), in this process."""
    from varstudent.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["varstudent", *args])
    logger = logging.getLogger("varstudent")
    handlers = list(logger.handlers)
    code: int | str | None = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # escaped main(): on the real CLI this would be a traceback
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, -1, captured.out, f"{captured.err}\nTraceback: {exc!r}")
    finally:
        logger.handlers[:] = handlers
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code or 0, captured.out, captured.err)


@pytest.mark.parametrize("command,overrides,setup,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(command: str, overrides: list[str], setup: Setup, fragments: tuple[str, ...],
                                      finished: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "artifacts"
    shutil.copytree(finished, out)
    extra = setup(out, tmp_path)
    before = _snapshot(out)
    result = run_main([command, "--out", str(out), *_sets(*overrides), *extra], tmp_path, monkeypatch, capsys)
    assert_clean_error(result, *fragments)
    assert _snapshot(out) == before  # nothing written, nothing half-replaced
    assert not [p for p in out.parent.rglob(".*") if p.name.endswith((".staging", ".retired", ".tmp"))]


@pytest.mark.parametrize("overrides,fragment", [
    (["student.arch=mlp-128"], "must have fewer weights than the teacher"),
    (["student.arch=mlp-16", "distill.bsr_weight=0.001"], "BSR pairs layers by depth"),
    (["student.arch=lenet5"], "architecture lenet5 needs larger inputs than 8x8"),
    (["teacher.source=models:/varstudent-teacher@champion"], "needs tracking.enabled: true"),
])
def test_run_refuses_what_the_settings_decide_before_any_stage_replaces_its_outputs(
        overrides: list[str], fragment: str, finished: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "artifacts"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    started = time.monotonic()
    result = run_main(["run", "--out", str(out), *_sets(*overrides)], tmp_path, monkeypatch, capsys)
    assert_clean_error(result, fragment)
    assert _snapshot(out) == before  # prepare and teacher did not run and replace their folders first
    assert "prepare" not in result.stderr and time.monotonic() - started < 30


def _cases_run(test) -> int:
    """How many cases pytest runs of `test` here: the product of its parametrize lists, 0 when a skipif holds."""
    marks = getattr(test, "pytestmark", [])
    if any(mark.name == "skipif" and mark.args and mark.args[0] for mark in marks):
        return 0
    return math.prod(len(mark.args[1]) for mark in marks if mark.name == "parametrize")


def test_the_catalogue_is_complete() -> None:
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids)
    # the foundation issue's list, as far as it is a CLI matter (IDX headers and sha256: test_cli, test_data)
    assert {"unknown-key", "absurd-loss-weight", "nan-weight", "no-teacher", "data-corrupt", "data-truncated",
            "params-missing", "student-not-smaller"} <= set(ids)
    services = [test_an_unreachable_tracking_server_is_a_bounded_clear_error,
                test_a_tracking_server_answering_errors_is_a_bounded_clear_error,
                test_a_full_disk_is_a_clear_error_and_leaves_no_partial_output,
                test_a_read_only_output_folder_is_a_clear_error]
    # counted from the marks, so a dropped parametrize case or a skip that holds here lowers the count
    assert len(CASES) + sum(_cases_run(test) for test in services) >= 67


# --- services and the disk: real subprocesses (a file-size limit, sockets, bounded retry timing)


@pytest.mark.parametrize("uri,what", [
    ("http://127.0.0.1:{port}/", "MLflow tracking store http://127.0.0.1:{port}/ is unreachable after 2 attempts"),
    ("postgresql+psycopg://varstudent:s3cret@127.0.0.1:{port}/mlflow",
     "MLflow tracking store postgresql+psycopg://varstudent:***@127.0.0.1:{port}/mlflow is unreachable after 2 "
     "attempts"),
], ids=["mlflow-http-unreachable", "postgresql-refusing"])
def test_an_unreachable_tracking_server_is_a_bounded_clear_error(uri: str, what: str, finished: Path,
                                                                 tmp_path: Path) -> None:
    shutil.copytree(finished, tmp_path / "artifacts")
    before = _snapshot(tmp_path / "artifacts")
    started = time.monotonic()
    with _closed_port() as port:
        result = cli("teacher", *_sets("tracking.enabled=true", f"tracking.uri={uri.format(port=port)}",
                                       "services.retries=1", "services.timeout_s=2"), cwd=tmp_path)
    assert_clean_error(result, what.format(port=port), "Connection refused")
    assert "s3cret" not in result.stderr  # the password never reaches a log
    assert time.monotonic() - started < 60  # bounded: 2 attempts, no library retry loop of minutes
    assert _snapshot(tmp_path / "artifacts") == before


class _Broken(BaseHTTPRequestHandler):
    """A tracking server that is up but failing: 503 to everything."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(503)
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args) -> None:
        pass


def test_a_tracking_server_answering_errors_is_a_bounded_clear_error(finished: Path, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    shutil.copytree(finished, tmp_path / "artifacts")
    before = _snapshot(tmp_path / "artifacts")
    started = time.monotonic()
    try:
        result = cli("teacher", *_sets("tracking.enabled=true", f"tracking.uri={uri}", "services.retries=1"),
                     cwd=tmp_path)
    finally:
        server.shutdown()
    assert_clean_error(result, f"MLflow tracking store {uri} is not usable")
    assert time.monotonic() - started < 90  # MLflow's HTTP retries are bounded by services.retries
    assert _snapshot(tmp_path / "artifacts") == before


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # CPython ignores SIGXFSZ: writes fail EFBIG


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_output(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    exe = shutil.which("varstudent", path=str(Path(sys.executable).parent)) or "varstudent"
    # a teacher of ~85 KB: its first checkpoint or its weights hit the 20 KB file-size limit
    result = subprocess.run([exe, "teacher", *_sets("teacher.arch=mlp-128-64")], cwd=tmp_path,
                            capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert_clean_error(result, "File too large")
    assert _snapshot(out) == before
    assert not [p for p in out.rglob("*") if p.name.endswith((".staging", ".retired", ".tmp"))]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; run as a normal user to check")
def test_a_read_only_output_folder_is_a_clear_error(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    out.chmod(0o555)
    try:
        result = cli("teacher", *_sets(), cwd=tmp_path)
    finally:
        out.chmod(0o755)
    assert_clean_error(result, "Permission denied", str(out))
    assert _snapshot(out) == before


@pytest.mark.parametrize("args,fragment", [
    (["registry"], "No such command 'registry'"),
    (["run", "--bogus"], "No such option: --bogus"),
    (["predict"], "Missing argument 'MODEL'"),
    (["tune", "--workers", "0"], "--workers"),
    (["predict", "model", "--input", "x.npy", "--threads", "-1"], "--threads"),
    (["predict", "model", "--input", "x.npy", "--threads", "100000"], "--threads"),  # once a segfault
])
def test_a_command_line_mistake_is_a_usage_error_not_a_traceback(args: list[str], fragment: str, tmp_path: Path,
                                                                 monkeypatch, capsys) -> None:
    """typer >= 0.29 raises its own copy of click's usage errors: they must still end as click's usual message."""
    result = run_main(args, tmp_path, monkeypatch, capsys)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr[-2000:]
    assert "Usage: " in result.stderr


def test_ctrl_c_ends_a_stage_with_130_and_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    """An interrupted run must not read as a success (`varstudent run && deploy`): typer turns Ctrl-C into a
    returned exit code, which main() once dropped (exit 0, no message)."""
    from varstudent import stages

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "prepare", interrupted)
    result = run_main(["prepare", "--out", str(tmp_path / "out"), *_sets()], tmp_path, monkeypatch, capsys)
    assert result.returncode == 130, (result.returncode, result.stderr[-2000:])
    assert "varstudent: interrupted" in result.stderr and "Traceback" not in result.stderr


def test_compiling_the_pipeline_to_a_non_yaml_file_is_one_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    result = run_main(["pipeline", "compile", "--output", str(tmp_path / "afile")], tmp_path, monkeypatch, capsys)
    assert_clean_error(result, "--output", "name a .yaml file")
    assert not (tmp_path / "afile").exists()
