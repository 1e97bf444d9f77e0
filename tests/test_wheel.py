"""The package as a user installs it: a wheel built from the repository, installed into a fresh virtual
environment outside it, must run both jobs' command lines and import every module (with the repository
nowhere on the path), as the Docker image and the cluster launcher's nodes do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a build of the repository reads; the rest (virtual environments, outputs, caches) stays behind.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    "demo-data", "demo-output", "bench-output")


def repository_modules() -> list[str]:
    """Every module under dcfm/ in the repository, as an import name."""
    names = []
    for path in sorted((REPO / "dcfm").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] != "__main__":  # importing it runs the command line
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the wheel; dependencies come from this environment's
    site-packages through a .pth file, so the test downloads nothing (torch alone is gigabytes)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "dist"), str(source)], check=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("dcfm-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True)
    return venv


def run_outside(venv: Path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository is not on the path
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(command, cwd=venv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["segment", "train", "evaluate"])
def test_installed_command_lines_answer_help(installed: Path, job: str) -> None:
    result = run_outside(installed, str(installed / "bin" / "dcfm"), job, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: dcfm {job}" in result.stdout and "exit status" in result.stdout


@pytest.mark.slow
def test_installed_wheel_holds_every_module_and_the_schemas(installed: Path) -> None:
    modules = repository_modules()
    assert {"dcfm.segment.job", "dcfm.train.loop", "dcfm.evaluate.job", "dcfm.data.synth"} <= set(modules)
    code = (
        "import importlib, os\n"
        f"venv = {str(installed.resolve())!r}\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert os.path.realpath(module.__file__).startswith(venv), (name, module.__file__)\n"
        "from dcfm.schemas import SCHEMA_NAMES, output_schema\n"
        "print(sorted(output_schema(n).version for n in SCHEMA_NAMES))\n"
    )
    result = run_outside(installed, str(installed / "bin" / "python"), "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("[")
