"""The distribution: an sdist that carries csrc/, a wheel built from it with the compiled op and a torch pin, and
that wheel working in a fresh virtual environment.

Built from a copy of the checkout's files (tracked and untracked-but-not-ignored, i.e. what a clone plus local
work holds, without .venv, build/ or a compiled rpo/_C.so), so the build never writes into the checkout and cannot
pick up a stale extension. The wheel is built from the sdist with `pip wheel --no-build-isolation --no-deps`
(the cluster-node path; `make wheel` runs the same build from the checkout). With RPO_WHEEL=path/to.whl the
given wheel (e.g. `make wheel`'s dist/rpo-*.whl) is checked instead of building one.

The fresh environment is a `venv --without-pip` whose third-party packages (torch, transformers, ...) come from
this interpreter's site-packages through a .pth file (no downloads, seconds instead of minutes; .pth files of that
folder, such as the checkout's editable install, are not processed). The wheel is installed with --no-deps and
tests/wheel_smoke.py runs there with `python -I` from a temporary directory. `make wheel-check-full` does the
same with real dependency resolution from the package index.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE_SCRIPT = REPO / "tests" / "wheel_smoke.py"
TORCH_RELEASE = torch.__version__.split("+")[0]
BUILD_TIMEOUT = 900


def rpo_release() -> str:
    import rpo

    return rpo.__version__


def _run(command, cwd, timeout=BUILD_TIMEOUT, env=None):
    proc = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, (f"{' '.join(map(str, command))} failed ({proc.returncode}):\n"
                                  + "\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
    return proc


def _distribution_files() -> list[str]:
    """The checkout's files a clone (plus uncommitted work) would have: tracked + untracked-not-ignored."""
    proc = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"git ls-files failed in {REPO}: {proc.stderr}")
    return [name for name in proc.stdout.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("rpo-source")
    for name in _distribution_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return source


@pytest.fixture(scope="module")
def sdist(source_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    # setup.py is the build definition (setuptools + torch.utils.cpp_extension); `python -m build --sdist
    # --no-isolation` runs the same code but needs the `build` package.
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", out], cwd=source_copy, timeout=300)
    archives = list(out.glob("rpo-*.tar.gz"))
    assert len(archives) == 1, archives
    return archives[0]


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    given = os.environ.get("RPO_WHEEL")
    if given:
        path = Path(given).resolve()
        assert path.is_file(), f"RPO_WHEEL={given} is not a file"
        return path
    out = tmp_path_factory.mktemp("wheel")
    # --no-cache-dir: pip would otherwise cache the wheel built from this sdist and could reuse a stale one.
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir", "-q",
          "-w", out, sdist], cwd=out)
    wheels = list(out.glob("rpo-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_sdist_carries_every_native_source(sdist, source_copy):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected_native = {str(p.relative_to(source_copy)) for p in (source_copy / "csrc").rglob("*") if p.is_file()}
    assert expected_native, "the checkout has no csrc/ files"
    assert {n for n in expected_native if n.endswith((".cuh", ".h", ".cu", ".cpp"))} == expected_native
    missing = sorted(expected_native - names)
    assert not missing, f"sdist lacks {missing} (MANIFEST.in must graft csrc/)"
    for required in ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md"):
        assert required in names, f"sdist lacks {required}"
    missing_modules = sorted(set(_package_modules(source_copy)) - names)
    assert not missing_modules, f"sdist lacks {missing_modules}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], "sdist holds build products"


def _package_modules(source: Path) -> list[str]:
    """Every module of the rpo package in the checkout's files, as paths relative to the source root."""
    modules = [str(p.relative_to(source)) for p in (source / "rpo").rglob("*.py")]
    assert "rpo/__init__.py" in modules, "the checkout has no rpo package"
    return modules


def test_wheel_holds_the_compiled_op_and_pins_torch(wheel, source_copy):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
        wheel_info = archive.read(metadata_name.replace("METADATA", "WHEEL")).decode()
    extensions = [n for n in names if n.startswith("rpo/_C") and n.endswith(".so")]
    assert len(extensions) == 1, f"wheel should hold exactly one rpo/_C*.so, has {extensions}"
    missing_modules = sorted(set(_package_modules(source_copy)) - set(names))
    assert not missing_modules, f"wheel lacks {missing_modules}"
    assert not [n for n in names if n.startswith(("csrc/", "tests/"))]
    requirements = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                    if line.startswith("Requires-Dist:")]
    torch_pins = [r for r in requirements if r.replace(" ", "").startswith("torch") and "extra" not in r]
    # The op is compiled against one torch ABI: the wheel must require exactly that release.
    assert torch_pins == [f"torch=={TORCH_RELEASE}"], torch_pins
    # A platform wheel (not pure Python), for the stable ABI of CPython >= 3.10 (one wheel per torch, not per
    # Python version).
    assert "Root-Is-Purelib: false" in wheel_info
    assert "-cp310-abi3-linux_" in wheel.name, wheel.name
    # The local version says which kernels are inside (PyTorch's convention): +cpu here, +cuXYZ with CUDA.
    label = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    version = next(line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Version:"))
    assert version == f"{rpo_release()}+{label}", version
    assert wheel.name.startswith(f"rpo-{version}-"), wheel.name


def _fresh_venv(root: Path) -> Path:
    """`venv --without-pip` whose third-party packages are this interpreter's (see the module docstring)."""
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent, timeout=120)
    python = root / "bin" / "python"
    site_packages = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              cwd=root).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_rpo_test_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    return python


def test_wheel_installs_and_runs_in_a_fresh_environment(wheel, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--no-cache-dir",
          "-q", wheel], cwd=tmp_path, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = _run([python, "-I", SMOKE_SCRIPT], cwd=outside, timeout=300, env=env)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["failures"] == []
    venv = (tmp_path / "venv").resolve()
    assert Path(results["rpo_file"]).resolve().is_relative_to(venv)
    assert Path(results["extension_file"]).resolve().is_relative_to(venv)
    assert not Path(results["rpo_file"]).resolve().is_relative_to(REPO)
    assert results["torch_requirement"] == [f"torch=={TORCH_RELEASE}"]
    assert results["op_embedding_float64_relative_error"] < 1e-10
    assert results["op_embedding_float32_relative_error"] < 1e-5
    assert results["op_uniform_float64_relative_error"] < 1e-10
    assert {"dpo", "rpo", "simpo"} <= set(results["losses"])
    assert results["dpo_loss"] == pytest.approx(results["dpo_expected"], rel=1e-12)
