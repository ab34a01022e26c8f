"""The wheel carries the package, its data and the shipped drafter, and nothing at the top
level but `mlx_redrafter`; the defaults find the drafter inside an installed package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from mlx_redrafter import defaults


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the sources (the working tree stays clean)."""
    setuptools = pytest.importorskip("setuptools")
    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, (
        f"setuptools {setuptools.__version__} cannot build this project: run setup.sh"
    )
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", src)
    shutil.copy(REPO_ROOT / "README.md", src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "mlx_redrafter", src / "mlx_redrafter", ignore=ignore)
    # weights/ minus the generated default model (weights/models/, gitignored).
    shutil.copytree(REPO_ROOT / "weights", src / "weights", ignore=shutil.ignore_patterns("models"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(root / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (path,) = (root / "dist").glob("mlx_redrafter-*.whl")
    return path


def _setuptools_floor(requirements: list[str]) -> tuple[int, ...] | None:
    for req in requirements:
        m = re.fullmatch(r"setuptools\s*>=\s*([\d.]+)", req.split(";")[0].strip())
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    return None


def test_the_setup_installs_a_setuptools_that_reads_the_license():
    # `license = "Apache-2.0"` (an SPDX string, PEP 639) needs setuptools 77; an older one
    # (a fresh Python 3.11 venv has 65.5) rejects pyproject.toml, and the wheel test fails
    # right after the README's set-up. The build requirement, the dev extra (the test builds
    # with the venv's own setuptools) and scripts/setup.sh must all ask for 77 or later.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    if isinstance(project["project"].get("license"), str):
        assert _setuptools_floor(project["build-system"]["requires"]) >= (77,)
        assert _setuptools_floor(project["project"]["optional-dependencies"]["dev"]) >= (77,)
        setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
        assert re.search(r'pip install .*--upgrade .*"setuptools>=(7[7-9]|[89]\d|\d{3})', setup)


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"mlx_redrafter"}  # no `cli`
    # Every module and data file of the package, including subpackages added later.
    for path in (REPO_ROOT / "mlx_redrafter").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            name = path.relative_to(REPO_ROOT).as_posix()
            assert name in names, f"{name} is missing from the wheel"
    shipped = REPO_ROOT / "weights" / defaults.DEFAULT_DRAFTER_NAME
    for file in ("config.json", "model.safetensors"):
        assert f"mlx_redrafter/weights/{defaults.DEFAULT_DRAFTER_NAME}/{file}" in names
        assert (shipped / file).is_file()
    assert not any("/models/" in n for n in names)  # the built default model stays out
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mlx-redrafter = mlx_redrafter.cli:main" in text


def test_home_and_drafter_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_REDRAFTER_HOME", raising=False)
    # In a checkout: the repository's weights/.
    assert defaults.home_dir() == REPO_ROOT / "weights"
    assert defaults.default_drafter_dir() == REPO_ROOT / "weights" / defaults.DEFAULT_DRAFTER_NAME
    # MLX_REDRAFTER_HOME decides the default model, and a drafter there wins.
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    from mlx_redrafter.defaults import DEFAULT_MODEL_NAME, default_model_dir

    monkeypatch.delenv("MLX_REDRAFTER_DEFAULT_MODEL", raising=False)
    assert default_model_dir() == tmp_path / "models" / DEFAULT_MODEL_NAME
    assert defaults.default_drafter_dir() == defaults.shipped_drafter_dir()
    (tmp_path / defaults.DEFAULT_DRAFTER_NAME).mkdir()
    assert defaults.default_drafter_dir() == tmp_path / defaults.DEFAULT_DRAFTER_NAME


def test_installed_layout_finds_the_packaged_drafter(tmp_path, monkeypatch):
    # As in site-packages: no pyproject.toml beside the package, the drafter inside it.
    package = tmp_path / "site-packages" / "mlx_redrafter"
    (package / "weights" / defaults.DEFAULT_DRAFTER_NAME).mkdir(parents=True)
    monkeypatch.setattr(defaults, "PACKAGE_DIR", package)
    monkeypatch.setattr(defaults, "REPO_ROOT", package.parent)
    monkeypatch.delenv("MLX_REDRAFTER_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert defaults.home_dir() == tmp_path / "data" / "mlx-redrafter"
    assert defaults.default_drafter_dir() == package / "weights" / defaults.DEFAULT_DRAFTER_NAME
