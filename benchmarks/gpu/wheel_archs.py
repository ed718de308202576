"""Which GPU architectures a built rpo._C holds, against those the build promised (setup.py's arch list).

    python benchmarks/gpu/wheel_archs.py dist/cuda/rpo-*.whl      # or a path to _C.so; exit 1 if one is missing

Reads `cuobjdump --list-elf` (machine code, sm_XX) and `--list-ptx` (PTX for the driver to JIT-compile) of the
extension and compares them with setup.py's `cuda_targets(cuda_arch_list())`, i.e. TORCH_CUDA_ARCH_LIST or
setup.py's default. Prints one JSON object. cuobjdump comes from PATH, $CUDA_HOME/bin or Triton's package.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_module():
    """setup.py as a module (its build runs only as a script)."""
    spec = importlib.util.spec_from_file_location("rpo_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(str(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("cuobjdump not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, Triton's package)")


def listed_archs(cuobjdump: str, library: Path, what: str) -> list[str]:
    """Architectures of `cuobjdump --list-elf|--list-ptx`: lines such as `ELF file 1: _C.1.sm_90.cubin`."""
    proc = subprocess.run([cuobjdump, f"--list-{what}", str(library)], capture_output=True, text=True)
    if proc.returncode != 0 and "does not contain" not in proc.stderr + proc.stdout:
        raise SystemExit(f"cuobjdump --list-{what} {library} failed: {proc.stderr.strip()}")
    return sorted({f"sm_{number}" for number in re.findall(r"\bsm_(\d+[a-z]?)\b", proc.stdout)},
                  key=lambda name: int(re.sub(r"\D", "", name)))


def extension_of(path: Path, workdir: Path) -> Path:
    if path.suffix != ".whl":
        return path
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"rpo/_C[^/]*\.so", n)]
        if len(names) != 1:
            raise SystemExit(f"{path} should hold exactly one rpo/_C*.so, holds {names}")
        return Path(archive.extract(names[0], workdir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a wheel or an _C*.so")
    args = parser.parse_args(argv)
    setup_module = build_module()
    arch_list = setup_module.cuda_arch_list()
    promised_sass, promised_ptx = setup_module.cuda_targets(arch_list)
    promised_ptx = [name.replace("compute_", "sm_") for name in promised_ptx]  # cuobjdump names PTX sm_XX
    cuobjdump = find_cuobjdump()
    with tempfile.TemporaryDirectory() as workdir:
        library = extension_of(args.path, Path(workdir))
        elf, ptx = listed_archs(cuobjdump, library, "elf"), listed_archs(cuobjdump, library, "ptx")
    result = {"file": str(args.path), "arch_list": arch_list, "elf": elf, "ptx": ptx,
              "missing_elf": [a for a in promised_sass if a not in elf],
              "missing_ptx": [a for a in promised_ptx if a not in ptx], "cuobjdump": cuobjdump}
    print(json.dumps(result))
    return 1 if result["missing_elf"] or result["missing_ptx"] else 0


if __name__ == "__main__":
    sys.exit(main())
