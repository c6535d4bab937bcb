"""tools/install.sh finds each lane's Python: python3.X where it runs, else the newest pyenv
version that works; with none, one line naming what is missing. Run on a copy of the installer
that has no venv yet, so nothing is installed."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_line_error

SYSTEM_PATH = "/usr/bin:/bin"  # dpkg, sed, sha256sum...: and no pyenv shims


def installer_copy(tmp_path: Path) -> Path:
    """The installer with the files it reads, in a directory of its own (it works on its parent)."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "install.sh", repo / "tools")
    for name in ("constraints.txt", "setup.cfg"):
        shutil.copy(ROOT / name, repo)
    return repo


def script(path: Path, body: str) -> None:
    """An executable shell script at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def install(repo: Path, lane: str, path: str, pyenv_root: Path) -> subprocess.CompletedProcess:
    """`TF=lane bash tools/install.sh` with this PATH and PYENV_ROOT (and no PYTHON override)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYENV_VERSION")}
    env |= {"TF": lane, "PATH": path, "PYENV_ROOT": str(pyenv_root)}
    return subprocess.run(["bash", str(repo / "tools" / "install.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def no_system_313():
    if shutil.which("python3.13", path=SYSTEM_PATH):
        pytest.skip("this machine has a system python3.13")


def test_lane_without_its_python_is_one_line(tmp_path, no_system_313):
    repo = installer_copy(tmp_path)
    proc = install(repo, "2.21", SYSTEM_PATH, tmp_path / "no-pyenv")
    assert_one_line_error(proc, "TF=2.21", "needs Python 3.13", "python3.13")
    assert not (repo / ".venv-tf2.21").exists()


def test_unknown_lane_is_one_line(tmp_path):
    proc = install(installer_copy(tmp_path), "2.20", SYSTEM_PATH, tmp_path / "no-pyenv")
    assert_one_line_error(proc, "TF", "unknown lane '2.20'", "2.15 or 2.21")


def test_failing_shim_skipped_for_the_newest_working_pyenv_python(tmp_path, no_system_313):
    """A pyenv shim on PATH exits 127 when its version is not selected; pyenv's own 3.13.x
    interpreters are then tried newest first, and one that cannot make a venv is passed over."""
    repo, shims, root = installer_copy(tmp_path), tmp_path / "shims", tmp_path / "pyenv"
    script(shims / "python3.13", "echo 'pyenv: python3.13: command not found' >&2; exit 127")
    works = '[ "$1" = -c ] && exit 0; echo "venv made by $0" >&2; exit 3'  # stop before pip
    script(root / "versions/3.13.2/bin/python3.13", works)
    script(root / "versions/3.13.10/bin/python3.13", works)
    script(root / "versions/3.13.11/bin/python3.13", "exit 1")  # e.g. built without ensurepip
    proc = install(repo, "2.21", f"{shims}:{SYSTEM_PATH}", root)
    chosen = root / "versions/3.13.10/bin/python3.13"
    assert f"setup: creating .venv-tf2.21 with {chosen}" in proc.stdout, proc.stdout + proc.stderr
    assert f"venv made by {chosen}" in proc.stderr and proc.returncode == 3


def pin(name: str, lane: str) -> str:
    """The version constraints.txt pins `name` to in `lane` ("" for the default lane)."""
    prefix = f"#@tf{lane} " if lane else ""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{prefix}{name}=="):
            return line.removeprefix(prefix).split("==")[1].split()[0]
    raise AssertionError(f"constraints.txt pins no {name} for lane {lane or 'default'}")


def test_the_lane_runs_the_tensorflow_and_keras_it_pins():
    """The interpreter running the suite is its lane's: TF 2.15 with its own Keras 2 in .venv, TF 2.21
    with tf_keras as tf.keras in .venv-tf2.21 (a lane that quietly ran another TensorFlow would
    test nothing it claims)."""
    import tensorflow as tf  # after conftest's chexnet_hvd, which picks tf_keras where installed

    lane = "2.21" if Path(sys.prefix).name == ".venv-tf2.21" else ""
    assert tf.__version__ == pin("tensorflow-cpu", lane)
    keras = tf.keras.__name__.split(".")[0]
    if lane:
        from importlib.metadata import version
        assert keras == "tf_keras" and version("tf_keras") == pin("tf_keras", lane), keras
    else:
        assert keras in ("keras", "tensorflow"), keras
