"""Before the heavy start-up: where a run's model, data and caches are, and the cheap checks that fail in a second
instead of after minutes of model conversion (data files exist and are not empty, the tensor-parallel size fits
the launch and the model's heads, the run folder is not a previous run's, the batch layout divides).

Every rank runs the checks on its own (no collective: they read only files and the environment), so every rank
raises the same `ConfigError`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional

from rpo.train.config import ConfigError, TrainConfig, default_dataset_path

logger = logging.getLogger("rpo.train")

# What marks a folder as a previous run's (see `check_run_folder`).
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "final", "checkpoints")
# Everything a run writes in its folder; --overwrite removes these.
REMOVED_BY_OVERWRITE = RUN_OUTPUTS + ("loss.json", "curves.png", "tensorboard", "wandb")
# The loss a run trains with, every option resolved (rpo.losses.Loss.describe() and whether the data is paired):
# written at set-up, read by rpo-eval.
LOSS_FILE = "loss.json"


def launch_world_size() -> int:
    """Processes of this launch (torchrun's WORLD_SIZE; 1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def check_before_start(config: TrainConfig) -> None:
    """Every cheap check, in the order a user would fix them; raises ConfigError naming the option."""
    world = launch_world_size()
    check_tensor_parallel(config, world)
    config.batch_layout(world // config.tensor_parallel)
    check_data_source("--dataset", config.dataset or str(default_dataset_path()), given=bool(config.dataset))
    if config.eval_dataset:
        check_data_source("--eval-dataset", config.eval_dataset, given=True)
    if config.report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--report-to wandb: the wandb package is not installed (pip install wandb), or "
                              "choose --report-to tensorboard or none")
    check_run_folder(config)


def check_data_source(option: str, source: str, *, given: bool) -> None:
    """A local data file must exist and hold something; Hub names and folders are left to the loader."""
    path = Path(source).expanduser()
    looks_local = path.suffix in (".jsonl", ".json", ".parquet", ".csv", ".arrow") or str(source).startswith(
        (".", "/", "~"))
    if path.is_file():
        if path.stat().st_size == 0:
            raise ConfigError(f"{option} {source}: the file is empty (0 bytes)")
        return
    if path.is_dir():
        return
    if not given:
        raise ConfigError(f"the default data set {source} is missing (it ships beside the repository as "
                          f"../shared/data/); pass --dataset FILE")
    if looks_local:
        raise ConfigError(f"{option} {source}: no such file or folder")


def check_tensor_parallel(config: TrainConfig, world_size: int) -> None:
    tp = config.tensor_parallel
    if world_size % tp:
        raise ConfigError(f"--tensor-parallel {tp} does not divide the {world_size} process"
                          f"{'es' if world_size != 1 else ''} of this launch; pass a divisor of {world_size}")
    model = Path(config.model) if config.model else None
    config_file = model / "config.json" if model is not None and model.is_dir() else None
    if config_file is None or not config_file.is_file():
        check_expert_parallel(config, world_size)
        return  # a Hub name or the default model: checked when it is loaded
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"--model {config.model}: cannot read config.json ({error})") from None
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = hf_config.get(key)
        if isinstance(heads, int) and heads % tp:
            raise ConfigError(f"--tensor-parallel {tp} does not divide the model's {key} ({heads}, in "
                              f"{config_file}); pass a divisor of {heads}")
    check_expert_parallel(config, world_size, hf_config, config_file)


def check_expert_parallel(config: TrainConfig, world_size: int, hf_config: Optional[dict] = None,
                          config_file: Optional[Path] = None) -> None:
    """--expert-parallel against the launch and (when its config.json is local) a mixture-of-experts model."""
    from rpo.models.architectures import MOE_MODEL_TYPES

    ep, tp = config.expert_parallel, config.tensor_parallel
    if (world_size // tp) % ep:
        raise ConfigError(f"--expert-parallel {ep} does not divide the data-parallel size {world_size // tp} "
                          f"({world_size} processes / --tensor-parallel {tp})")
    if hf_config is None:
        return
    moe = hf_config.get("model_type") in MOE_MODEL_TYPES
    if ep > 1 and not moe:
        raise ConfigError(f"--expert-parallel {ep}: the model ({config_file}) has no experts (model_type "
                          f"{hf_config.get('model_type')!r})")
    experts = hf_config.get("num_local_experts") or hf_config.get("num_experts")
    if moe and isinstance(experts, int) and experts % ep:
        raise ConfigError(f"--expert-parallel {ep} does not divide the model's {experts} experts")
    if moe and tp > 1 and not config.sequence_parallel:
        raise ConfigError(f"--tensor-parallel {tp} with a mixture-of-experts model needs --sequence-parallel "
                          f"(megatron-core's MoE layer trains with tensor parallelism only with it)")


def previous_run_outputs(output_dir: Path) -> List[str]:
    """The outputs of a previous run in `output_dir` (names as a user reads them: 'final/', 'metrics.jsonl')."""
    found = []
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and any(path.iterdir()):
            found.append(name + "/")
        elif path.is_file():
            found.append(name)
    return found


def check_run_folder(config: TrainConfig) -> None:
    """A used --output-dir is refused unless --resume (continue it) or --overwrite (replace it)."""
    output_dir = Path(config.output_dir)
    found = previous_run_outputs(output_dir)
    if not found or config.resume:
        return
    if not config.overwrite:
        raise ConfigError(f"--output-dir {output_dir} holds a previous run ({', '.join(found)}); pass --resume to "
                          f"continue it, --overwrite to replace it, or another --output-dir")
    if is_rank_zero():  # the other ranks wait for rank 0 in the process-group start-up, after this
        removed = []
        for name in REMOVED_BY_OVERWRITE:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
                removed.append(name + "/")
            elif path.exists():
                path.unlink()
                removed.append(name)
        logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), output_dir)


# --- where the inputs are --------------------------------------------------------------------------------------
def resolve_model_path(name: str, option: str) -> str:
    """A local HF folder as is; otherwise a Hub name, fetched into (or found in, offline) the Hugging Face cache."""
    if Path(name).is_dir():
        return str(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return snapshot_download(name, allow_patterns=patterns)
    except HFValidationError:
        raise ConfigError(f"{option} {name}: not a folder and not a Hugging Face model name") from None
    except Exception as error:  # offline without a cached copy, unknown repo, no access, ...
        raise ConfigError(f"{option} {name}: not a local folder, and fetching it from the Hugging Face Hub failed "
                          f"({type(error).__name__}: {error})") from None


def default_cache_root() -> Path:
    return Path(os.environ.get("RPO_CACHE_DIR", Path.home() / ".cache" / "rpo"))


def default_model_path(progress: bool = False) -> str:
    from rpo.models.default_model import default_model_path as embedded

    return str(embedded(progress=progress))
