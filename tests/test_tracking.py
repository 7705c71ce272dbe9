"""Small pieces of the MLflow edge that need no store: lineage tags, the git commit, the PostgreSQL skip."""

from __future__ import annotations

import subprocess

import pytest

from varstudent import tracking
from varstudent.config import load_params


def test_lineage_tags_carry_commit_params_digest_dataset_and_kfp_run(monkeypatch: pytest.MonkeyPatch) -> None:
    params = load_params(None, ["data.dataset=digits"])
    monkeypatch.setenv("VARSTUDENT_GIT_COMMIT", "abc123")
    monkeypatch.setenv("KFP_RUN_ID", "run-42")
    tags = tracking.lineage_tags(params, "d1g357")
    assert tags == {"varstudent.git_commit": "abc123", "mlflow.source.git.commit": "abc123",
                    "varstudent.params_digest": params.digest(), "varstudent.kfp_run_id": "run-42",
                    "varstudent.dataset_digest": "d1g357"}
    monkeypatch.delenv("KFP_RUN_ID")
    assert "varstudent.kfp_run_id" not in tracking.lineage_tags(params, None)


def test_git_commit_is_unknown_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VARSTUDENT_GIT_COMMIT", raising=False)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert tracking.git_commit() == "unknown"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a repo"))
    assert tracking.git_commit() == "unknown"


def test_git_commit_marks_a_modified_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VARSTUDENT_GIT_COMMIT", raising=False)
    answers = {"rev-parse": "f00d" * 10, "status": " M varstudent/stages.py"}
    monkeypatch.setattr(subprocess, "run", lambda args, **k: subprocess.CompletedProcess(args, 0, answers[args[1]], ""))
    assert tracking.git_commit() == "f00d" * 10 + "-dirty"
    answers["status"] = ""
    assert tracking.git_commit() == "f00d" * 10


def test_postgres_tests_skip_with_a_hint_when_the_binaries_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import pg

    monkeypatch.setattr(pg.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(pg.glob, "glob", lambda pattern: [])
    assert pg.missing() == "PostgreSQL server binaries not found"
    assert "apt-get install postgresql" in pg.HINT


def test_register_needs_tracking(tmp_path) -> None:
    from varstudent import stages
    from varstudent.errors import ConfigError

    params = load_params(None, ["tracking.enabled=false"])
    with pytest.raises(ConfigError, match="register needs tracking.enabled: true"):
        stages.register(params, *(tmp_path / d for d in ("prepare", "teacher", "distill", "prune", "evaluate",
                                                         "register")))
