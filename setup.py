"""Build definition of the native op (`rpo._C`).

One build definition: setuptools + torch.utils.cpp_extension. CMakeLists.txt is the torch-free CUDA kernel
compile check (run by CI) and an alternative libtorch build for clusters; it does not build the wheel.
Measured pitfalls: ../shared/BUILD-NOTES.md (summarised in the comments below).

The build configuration (`build_config()`, `DEFAULT_CUDA_ARCH_LIST`, `local_version_label()`) is importable
without building: the build runs only when this file is executed as a script (pip's build backend does that).
"""
import glob
import os
import re

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The release, from rpo/__init__.py (read, not imported: importing rpo would need the extension being built).
VERSION = re.search(r'^__version__ = "([^"]+)"', open(os.path.join(ROOT, "rpo", "__init__.py")).read(), re.M)[1]

# GPUs of current data-centre clusters: A100 (8.0), A10/A40 (8.6), L4/L40S/RTX 6000 Ada (8.9), H100/H200 (9.0),
# B200/GB200 (10.0); "+PTX" embeds PTX of the newest so that later cards JIT-compile it (nvcc 13: 7.5 and up).
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0;10.0+PTX"


def cuda_home(environ=os.environ):
    # /usr/local/bin/nvcc is a wrapper: cpp_extension would guess CUDA_HOME=/usr/local; prefer explicit paths.
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            return environ[var]
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def want_cuda(environ=os.environ):
    if environ.get("RPO_FORCE_CPU") == "1":
        return False
    # A CPU torch wheel lacks libtorch_cuda and the CUDA cmake macros: the binding can only build on CUDA torch.
    return torch.version.cuda is not None and cuda_home(environ) is not None


def cuda_arch_list(environ=os.environ):
    """The TORCH_CUDA_ARCH_LIST the kernels are compiled for: the user's (to narrow it for a faster build, e.g.
    "9.0" for an H100-only cluster) or the default covering the data-centre GPUs above."""
    return environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST


def cuda_targets(arch_list):
    """(machine-code targets, PTX targets) of an arch list, as cuobjdump names them: "8.0;9.0+PTX" ->
    (["sm_80", "sm_90"], ["compute_90"]). Only numeric entries (cpp_extension's names such as "Hopper" are not
    expanded here)."""
    sass, ptx = [], []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        number = entry.split("+")[0].replace(".", "")
        sass.append(f"sm_{number}")
        if entry.endswith("+PTX"):
            ptx.append(f"compute_{number}")
    return sass, ptx


def local_version_label(environ=os.environ):
    """PEP 440 local version of the build, as PyTorch, torchvision and flash-attn label theirs: "cu130" when the
    CUDA kernels are compiled (torch's CUDA 13.0), "cpu" otherwise. Not part of the torch pin."""
    if want_cuda(environ):
        return "cu" + torch.version.cuda.replace(".", "")
    return "cpu"


def build_config(environ=os.environ):
    """Everything the build decides from torch and the environment, without building anything."""
    with_cuda = want_cuda(environ)
    # -g0: Python's default -g makes a 3.5 MB .so; -fopenmp: at::parallel_for is single-threaded without it.
    # No -std=: cpp_extension adds the standard its headers need (C++17 up to torch 2.12, C++20 from 2.13).
    cxx = ["-O3", "-g0", "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
    config = {
        "with_cuda": with_cuda,
        "version": f"{VERSION}+{local_version_label(environ)}",
        "cxx_flags": cxx + (["-DRPO_WITH_CUDA"] if with_cuda else []),
        "link_flags": ["-fopenmp"],
        "sources": sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                          + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
    }
    if with_cuda:
        config["cuda_home"] = cuda_home(environ)
        config["cuda_arch_list"] = cuda_arch_list(environ)
        # No --use_fast_math: no test bounds the kernels' float32 error with it.
        config["nvcc_flags"] = ["-O3", "-DRPO_WITH_CUDA"]
        config["sources"] += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return config


def extensions(config):
    if config["with_cuda"]:
        # cpp_extension reads CUDA_HOME when it is imported, TORCH_CUDA_ARCH_LIST when it compiles.
        os.environ["CUDA_HOME"] = config["cuda_home"]
        os.environ["TORCH_CUDA_ARCH_LIST"] = config["cuda_arch_list"]
    from torch.utils import cpp_extension

    kwargs = dict(
        name="rpo._C",
        sources=[os.path.relpath(path, ROOT) for path in config["sources"]],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=config["link_flags"],
        py_limited_api=True,
    )
    if config["with_cuda"]:
        ext = cpp_extension.CUDAExtension(
            extra_compile_args={"cxx": config["cxx_flags"], "nvcc": config["nvcc_flags"]}, **kwargs)
    else:
        ext = cpp_extension.CppExtension(extra_compile_args={"cxx": config["cxx_flags"]}, **kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)
    return [ext], build_ext


def torch_pin():
    # The compiled op is tied to the torch ABI it was built against: pin that exact release (any local label, so
    # torch 2.14.1 from PyPI and 2.14.1+cu130 from PyTorch's index both satisfy it).
    return f"torch=={torch.__version__.split('+')[0]}"


if __name__ == "__main__":
    CONFIG = build_config()
    EXT_MODULES, BUILD_EXT = extensions(CONFIG)
    setup(
        version=CONFIG["version"],
        ext_modules=EXT_MODULES,
        cmdclass={"build_ext": BUILD_EXT},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
        install_requires=[
            torch_pin(),
            "numpy",
            "transformers>=4.56",
            "sentence-transformers>=3.0",
            "datasets>=3.0",
            "megatron-core>=0.16.1",
            "pyyaml",
            "tqdm",
            "matplotlib",
            "safetensors",
            "psutil",
        ],
    )
