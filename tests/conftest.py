"""Shared fixtures: a tiny prepared dataset built from scikit-learn's digits (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared digits (1,437 train / 360 test, 1x8x8), written once per test session."""
    from varstudent import stages
    from varstudent.config import load_params

    out = tmp_path_factory.mktemp("digits") / "prepare"
    stages.prepare(load_params(None, ["data.dataset=digits", "tracking.enabled=false"]), out)
    return out


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    """Run the installed `varstudent` console script in a real subprocess."""
    exe = shutil.which("varstudent", path=str(Path(sys.executable).parent)) or "varstudent"
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return subprocess.run([exe, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """One error line naming the problem, exit 1, and no Python traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("varstudent: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="session")
def postgres_server_url():
    """A throwaway PostgreSQL on 127.0.0.1 for the whole session (tests/pg.py); skipped without the binaries."""
    from tests import pg

    why = pg.missing()
    if why:
        pytest.skip(f"{why}: {pg.HINT}")
    with pg.postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server_url):
    """A fresh, empty database on the session's server: MLflow and Optuna both keep an `alembic_version` table."""
    from tests import pg

    return pg.create_database(postgres_server_url)


def modules_loaded_by(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with any of `prefixes` that `import {imports}` loads, in a fresh interpreter."""
    code = (f"import sys, {imports}; "
            f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in {prefixes!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return out.stdout.split()


def forge_json(path: Path, change) -> None:
    """Edit an artifact's JSON and sign the pair again, as a forger who knows the format would: the digest of
    the JSON in NAME.safetensors' header and the weights' sha256 in the JSON both match the edit, so only the
    deeper checks (shapes, ranges, kinds) can catch it. A JSON without such a partner is just rewritten."""
    from safetensors.torch import load, save

    from varstudent.artifacts import DOC_DIGEST_KEY, _doc_digest

    doc = json.loads(path.read_text())
    change(doc)
    weights = path.with_suffix(".safetensors")
    if weights.is_file() and isinstance(doc, dict) and "sha256" in doc:
        blob = save(load(weights.read_bytes()), metadata={DOC_DIGEST_KEY: _doc_digest(doc)})
        weights.write_bytes(blob)
        doc["sha256"] = hashlib.sha256(blob).hexdigest()
    path.write_text(json.dumps(doc))
