"""The build configuration of setup.py, read without building: which GPUs the CUDA kernels are compiled for,
how TORCH_CUDA_ARCH_LIST narrows that, how CPU and CUDA builds are told apart, and the flags that cluster builds
need (CUDA_HOME, no hand-written -std=, no --use_fast_math)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("rpo_setup_under_test", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the configuration; setup() runs only as a script
    return module


@pytest.fixture
def cuda_torch(monkeypatch, build):
    """The configuration as on a CUDA 13.0 build of torch (this machine's torch is a CPU build)."""
    monkeypatch.setattr(build.torch.version, "cuda", "13.0")
    return {"CUDA_HOME": "/opt/cuda-13.0"}


def test_default_arch_list_covers_the_data_centre_gpus_with_ptx_for_newer_ones(build):
    assert build.DEFAULT_CUDA_ARCH_LIST == "8.0;8.6;8.9;9.0;10.0+PTX"
    sass, ptx = build.cuda_targets(build.DEFAULT_CUDA_ARCH_LIST)
    # A100, A10/A40, L4/L40S, H100/H200, B200 machine code; PTX of the newest for the driver to JIT on later cards.
    assert sass == ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100"]
    assert ptx == ["compute_100"]


def test_cpp_extension_turns_the_default_list_into_these_nvcc_targets(build, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
    flags = cpp_extension._get_cuda_arch_flags()
    expected = {f"-gencode=arch=compute_{n},code=sm_{n}" for n in (80, 86, 89, 90, 100)}
    expected.add("-gencode=arch=compute_100,code=compute_100")
    assert set(flags) == expected


def test_cuda_build_uses_the_default_list_and_tells_cpp_extension(build, cuda_torch):
    config = build.build_config(cuda_torch)
    assert config["with_cuda"]
    assert config["cuda_arch_list"] == build.DEFAULT_CUDA_ARCH_LIST
    assert config["cuda_home"] == "/opt/cuda-13.0"
    assert any(path.endswith(".cu") for path in config["sources"])


@pytest.mark.parametrize("narrowed, sass, ptx", [
    ("9.0", ["sm_90"], []),
    ("8.0;9.0+PTX", ["sm_80", "sm_90"], ["compute_90"]),
    ("8.0 9.0", ["sm_80", "sm_90"], []),
])
def test_torch_cuda_arch_list_narrows_the_build(build, cuda_torch, narrowed, sass, ptx):
    config = build.build_config(dict(cuda_torch, TORCH_CUDA_ARCH_LIST=narrowed))
    assert config["cuda_arch_list"] == narrowed
    assert build.cuda_targets(config["cuda_arch_list"]) == (sass, ptx)


def test_empty_torch_cuda_arch_list_means_the_default(build, cuda_torch):
    assert build.build_config(dict(cuda_torch, TORCH_CUDA_ARCH_LIST=" "))["cuda_arch_list"] == \
        build.DEFAULT_CUDA_ARCH_LIST


def test_local_version_tells_cuda_and_cpu_builds_apart(build, cuda_torch):
    release = build.VERSION
    assert build.build_config(cuda_torch)["version"] == f"{release}+cu130"
    assert build.build_config(dict(cuda_torch, RPO_FORCE_CPU="1"))["version"] == f"{release}+cpu"
    assert build.build_config({"RPO_FORCE_CPU": "1"})["with_cuda"] is False


def test_cpu_torch_builds_the_cpu_wheel(build):
    # This machine's torch has no CUDA: the CPU kernel only, labelled as such.
    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} has CUDA")
    config = build.build_config({})
    assert config["with_cuda"] is False
    assert config["version"] == f"{build.VERSION}+cpu"
    assert not any(path.endswith(".cu") for path in config["sources"])


def test_version_is_the_package_release(build):
    import rpo

    assert build.VERSION == rpo.__version__


def test_flags_leave_the_language_standard_to_cpp_extension_and_have_no_fast_math(build, cuda_torch):
    config = build.build_config(cuda_torch)
    flags = config["cxx_flags"] + config["nvcc_flags"]
    # torch >= 2.13 headers need C++20: cpp_extension adds the standard its headers need.
    assert not [flag for flag in flags if flag.startswith("-std")]
    assert "--use_fast_math" not in flags
    assert {"-O3", "-g0", "-fopenmp"} <= set(config["cxx_flags"])
    assert "-fopenmp" in config["link_flags"]


def test_cuda_home_prefers_explicit_variables(build):
    assert build.cuda_home({"CUDA_HOME": "/a", "CUDA_PATH": "/b"}) == "/a"
    assert build.cuda_home({"CUDA_PATH": "/b"}) == "/b"


def test_cpp_extension_is_imported_only_after_cuda_home_is_set():
    # cpp_extension reads CUDA_HOME once, at import: loading setup.py's configuration must not import it.
    probe = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('s', {str(REPO / 'setup.py')!r}); "
             "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
             "print('torch.utils.cpp_extension' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_torch_pin_is_the_exact_release_without_local_label(build):
    assert build.torch_pin() == f"torch=={torch.__version__.split('+')[0]}"
