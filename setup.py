"""Build definition of the native op (`rpo._C`).

One build definition: setuptools + torch.utils.cpp_extension. CMakeLists.txt is the torch-free CUDA kernel
compile check (run by CI) and an alternative libtorch build for clusters; it does not build the wheel.
Measured pitfalls: ../shared/BUILD-NOTES.md (summarised in the comments below).
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    # /usr/local/bin/nvcc is a wrapper: cpp_extension would guess CUDA_HOME=/usr/local; prefer explicit paths.
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None


def _want_cuda():
    if os.environ.get("RPO_FORCE_CPU") == "1":
        return False
    # A CPU torch wheel lacks libtorch_cuda and the CUDA cmake macros: the binding can only build on CUDA torch.
    return torch.version.cuda is not None and _cuda_home() is not None


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -g0: Python's default -g makes a 3.5 MB .so; -fopenmp: at::parallel_for is single-threaded without it.
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++17", "-DPy_LIMITED_API=0x030A0000"]
    link = ["-fopenmp"]
    kwargs = dict(
        name="rpo._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=link,
        py_limited_api=True,
    )
    if _want_cuda():
        os.environ.setdefault("CUDA_HOME", _cuda_home())
        # nvcc 13 rejects anything below sm_75; default to Hopper (H100/H200).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx + ["-DRPO_WITH_CUDA"], "nvcc": ["-O3", "-DRPO_WITH_CUDA", "--use_fast_math"]},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext]


def torch_pin():
    # The compiled op is tied to the torch ABI it was built against: pin that exact release.
    return f"torch=={torch.__version__.split('+')[0]}"


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)},
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
