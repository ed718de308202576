"""Stage what the GPU check needs besides the checkout and the wheels, without any model weights (see check_common.py):

    python benchmarks/gpu/assets.py .gpu-bundle/assets      # `make gpu-wheels` runs this

- smollm2-135m/: config and tokenizer of the embedded default model (SmolLM2-135M-Instruct);
- minilm-l6/: the all-MiniLM-L6-v2 SentenceTransformer folder (tokenizer, pooling, normalisation) minus weights;
- paired.jsonl: the first 64 rows of ../shared/data/paired.jsonl (../shared does not travel to the GPU machine).
About 4.5 MB in all.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_common import MINILM_DIR, PAIRED_DATA, SMOLLM2_DIR  # noqa: E402

ROWS = 64
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "README.md", "data_config.json")


def stage(target: Path) -> Path:
    from rpo.data.embeddings import resolve_embedding_model
    from rpo.models.default_model import default_model_path

    target.mkdir(parents=True, exist_ok=True)
    for name, source in ((SMOLLM2_DIR, Path(default_model_path())),
                         (MINILM_DIR, Path(resolve_embedding_model("all-MiniLM-L6-v2")))):
        if not source.is_dir():
            raise SystemExit(f"{name}: {source} is not a local folder (HF_HUB_OFFLINE=1 resolves the packaged one)")
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(source, target / name, ignore=shutil.ignore_patterns(*WEIGHT_FILES, ".*"))
    rows = (REPO.parent / "shared" / "data" / "paired.jsonl").read_text().splitlines()[:ROWS]
    if len(rows) < ROWS:
        raise SystemExit(f"../shared/data/paired.jsonl has {len(rows)} rows, fewer than {ROWS}")
    (target / PAIRED_DATA).write_text("\n".join(rows) + "\n")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    stage(args.target)
    print(f"assets staged in {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
