"""The evaluation command: `rpo-eval`, `python -m rpo.evaluation` and examples/evaluate.py (docs/evaluation.md).

    python examples/evaluate.py --model runs/demo/final --dataset held_out.jsonl --output-json eval.json

Defaults missing from the command line come from the run's ``config.yaml`` (found in --model's folder or up to
two folders above it: ``<output-dir>/final`` and ``<output-dir>/checkpoints/<step>`` both work): the reference
model (the run's --reference-model, else its --model, else the embedded SmolLM2 default), beta and the reward type
(from the run's loss), the tokenisation lengths and --trust-remote-code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from rpo.evaluation.implicit_reward import REWARD_TYPES

logger = logging.getLogger("rpo.evaluate")

DEFAULT_BETA = 0.1  # the paper's; used only when neither --beta nor the run's loss gives one
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_PROMPT_LENGTH = 256


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the option or file."""


def build_parser(prog: str = "rpo-eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a trained policy: held-out implicit-reward accuracy and margin against the reference "
        "model, the policy's log-probs of chosen vs rejected answers, greedy generation for a prompt file, and "
        "the win rate of those generations under a pairwise judge (an OpenAI-compatible endpoint with the RPO "
        "paper's prompts, or a local reward function).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("models")
    model.add_argument("--model", required=True, metavar="DIR",
                       help="Policy to evaluate: a Hugging Face model folder (a run's final/) or Hub name.")
    model.add_argument("--reference", metavar="DIR", default=None,
                       help="Reference model for the implicit reward. Default: the model the run started from, read "
                       "from the run's config.yaml next to --model.")
    model.add_argument("--tokenizer", metavar="DIR", default=None,
                       help="Tokenizer (default: --model's, else the run's tokenizer or reference).")
    model.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="Model dtype; auto = bfloat16 on GPU, float32 on CPU.")
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    model.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=None,
                       help="Allow model code from the model folder (default: the run's setting, else off).")

    data = parser.add_argument_group("implicit-reward evaluation")
    data.add_argument("--dataset", metavar="FILE", default=None,
                      help="Held-out preference data (paired or unpaired; any layout rpo.data reads).")
    data.add_argument("--run-held-out", action="store_true",
                      help="Evaluate on the run's own held-out rows: its --eval-dataset, or the rows of its --dataset "
                      "that training held out (--eval-split-fraction, --seed), read from config.yaml. --dataset "
                      "defaults to the run's data then.")
    data.add_argument("--dataset-split", default="train", help="Split of --dataset (a single file is that split).")
    data.add_argument("--columns", default=None, help="Column mapping for other layouts, e.g. 'prompt=info.post,...'.")
    data.add_argument("--skip-bad-rows", action="store_true", help="Skip (and count) malformed rows.")
    data.add_argument("--max-examples", type=int, default=None, metavar="N",
                      help="Evaluate the first N rows only (the rest is counted in the log).")
    data.add_argument("--beta", type=float, default=None,
                      help="Reward scale beta (default: the run's loss beta, else 0.1).")
    data.add_argument("--reward-type", choices=REWARD_TYPES, default=None,
                      help="dpo: beta*(log pi - log pi_ref); simpo: beta/|y|*log pi, no reference. Default: simpo "
                      "if the run's loss needs no reference model, else dpo.")
    data.add_argument("--max-length", type=int, default=None,
                      help=f"Max prompt+response tokens (default: the run's, else {DEFAULT_MAX_LENGTH}).")
    data.add_argument("--max-prompt-length", type=int, default=None,
                      help=f"Max prompt tokens (default: the run's, else {DEFAULT_MAX_PROMPT_LENGTH}).")
    data.add_argument("--batch-size", type=int, default=4, help="Sequences per forward pass.")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompts", metavar="FILE", default=None,
                     help="Prompt file (.jsonl/.json with a 'prompt' field, or .txt one per line) to answer. "
                     "Default with --judge: the prompts of the evaluation data, its chosen answers as the baseline.")
    gen.add_argument("--baseline-field", default="chosen",
                     help="Field of the prompt file holding the baseline answer the judge compares against.")
    gen.add_argument("--max-prompts", type=int, default=None, metavar="N", help="Answer the first N prompts only.")
    gen.add_argument("--generations-output", metavar="FILE", default=None,
                     help="Write the prompts and answers (and baselines) as JSONL.")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="Tokens generated per answer at most.")
    gen.add_argument("--temperature", type=float, default=None,
                     help="Sampling temperature; 0 = greedy decoding. Default: 0 (the paper's setting), 1 with a "
                     "pointwise judge (n samples of the policy's own distribution).")
    gen.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (only with --temperature > 0).")
    gen.add_argument("--generation-batch-size", type=int, default=8, help="Prompts per generate call.")

    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge", default=None, metavar="NAME",
                       help="none; openai (an OpenAI-compatible endpoint, --judge-url); local-reward (--reward-fn); "
                       "or a pointwise judge: vader, hf (--judge-model DIR: a sequence-classification / reward "
                       "model), python (--reward-fn), a judge a plugin registers, 'file.py:fn' or 'pkg.module:fn' "
                       "(fn(prompt_text, response) -> float). Default: openai when --judge-url is given, else none.")
    judge.add_argument("--judge-mode", choices=("pairwise", "pointwise"), default=None,
                       help="pairwise: the policy's answers against --baseline, win rate. pointwise: "
                       "--samples-per-prompt samples of the policy and of the reference per prompt, the judge's "
                       "mean score of each with 95%% intervals, paired by prompt (and --kl). Default: pairwise for "
                       "openai and local-reward without --kl, else pointwise.")
    judge.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                       help="An option of the pointwise judge (VALUE parsed as YAML), e.g. label=POSITIVE for hf; "
                       "repeatable.")
    judge.add_argument("--samples-per-prompt", type=int, default=4, metavar="N",
                       help="Pointwise: samples per prompt of the policy (and of the reference).")
    judge.add_argument("--kl", action="store_true",
                       help="Pointwise: also the KL estimate from the reference, mean over the policy's samples of "
                       "sum log pi - log pi_ref (needs --temperature 1 and --top-p 1).")
    judge.add_argument("--samples-output", metavar="FILE", default=None,
                       help="Pointwise: write every sample (policy and reference: text, score, ended, log-probs) "
                       "as JSONL.")
    judge.add_argument("--reference-samples", metavar="FILE", default=None,
                       help="Pointwise: the reference's scored samples, read from FILE when it was written with the "
                       "same reference, prompts and settings, else computed and written there (several policies "
                       "against one reference sample it once).")
    judge.add_argument("--baseline", choices=("chosen", "reference"), default="chosen",
                       help="What the policy's answers are compared against: the prompt file's baseline answers "
                       "(--baseline-field; the paper compares with the test set's chosen answers) or the reference "
                       "model's answers generated with the same settings.")
    judge.add_argument("--judge-url", default=None,
                       help="OpenAI-compatible server: base URL (http://host:8000/v1) or the full "
                       "/v1/chat/completions URL.")
    judge.add_argument("--judge-model", default=None,
                       help="Model name sent to the judge endpoint; with --judge hf the model folder.")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                       help="Environment variable holding the endpoint's API key (sent as a Bearer token if set).")
    judge.add_argument("--judge-timeout", type=float, default=60.0, help="Seconds per judge request.")
    judge.add_argument("--judge-retries", type=int, default=2, help="Retries of a failed request (429, 5xx, network).")
    judge.add_argument("--judge-task", choices=("dialogue", "summarization"), default="dialogue",
                       help="Which of the paper's judge prompts to use.")
    judge.add_argument("--reward-fn", default=None, metavar="MODULE:FN",
                       help="With --judge local-reward or python: 'pkg.module:fn' or 'file.py:fn', "
                       "fn(prompt_text, response) -> float; pairwise, the higher reward wins, equal rewards tie.")
    judge.add_argument("--judgements-output", metavar="FILE", default=None,
                       help="Write every judgement (order shown, verdict, outcome, judge text) as JSONL.")
    judge.add_argument("--seed", type=int, default=0, help="Seed of the A/B order draws and of sampling.")

    out = parser.add_argument_group("output")
    out.add_argument("--output-json", metavar="FILE", default=None,
                     help="Write the metrics as JSON (they are printed in any case).")
    out.add_argument("--per-example-output", metavar="FILE", default=None,
                     help="Write per-row log-probs and rewards as JSONL.")
    out.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    def positive(name: str, value, allow_none: bool = True):
        if value is None and allow_none:
            return
        if value is None or value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")

    for name in ("max_examples", "max_length", "max_prompt_length", "max_prompts"):
        positive(name.replace("_", "-"), getattr(args, name))
    for name in ("batch_size", "max_new_tokens", "generation_batch_size"):
        positive(name.replace("_", "-"), getattr(args, name), allow_none=False)
    if args.beta is not None and not args.beta > 0:
        parser.error(f"--beta must be > 0, got {args.beta}")
    if args.temperature is not None and args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.judge_timeout <= 0:
        parser.error(f"--judge-timeout must be > 0, got {args.judge_timeout}")
    if args.judge_retries < 0:
        parser.error(f"--judge-retries must be >= 0, got {args.judge_retries}")
    if args.judge is None:
        args.judge = "openai" if args.judge_url else "none"
    if args.samples_per_prompt < 1:
        parser.error(f"--samples-per-prompt must be >= 1, got {args.samples_per_prompt}")
    if args.judge_mode is None:
        args.judge_mode = "pairwise" if args.judge in ("openai", "local-reward") and not args.kl else "pointwise"
    if args.judge != "none" and args.judge_mode == "pointwise":
        args.baseline = "reference"  # the paired comparison is with the reference's own samples
    if args.judge == "none" and args.kl:
        parser.error("--kl needs a pointwise judge (--judge NAME)")
    if args.judge_mode == "pairwise" and args.kl:
        parser.error("--kl is measured in --judge-mode pointwise")
    if args.temperature is None:
        args.temperature = 1.0 if args.judge != "none" and args.judge_mode == "pointwise" else 0.0
    if args.kl and (args.temperature != 1.0 or args.top_p != 1.0):
        parser.error(f"--kl estimates KL(policy || reference) from the policy's own samples: it needs --temperature 1 "
                     f"and --top-p 1 (got {args.temperature:g}, {args.top_p:g})")
    try:
        args.judge_options = parse_judge_options(args.judge_option)
    except ValueError as err:
        parser.error(str(err))
    if args.judge == "openai":
        if not args.judge_url:
            parser.error("--judge openai needs --judge-url (an OpenAI-compatible endpoint)")
        if not args.judge_model:
            parser.error("--judge-url needs --judge-model (the model name the endpoint serves)")
        if not args.judge_url.startswith(("http://", "https://")):
            parser.error(f"--judge-url must start with http:// or https://, got {args.judge_url!r}")
    if args.judge in ("local-reward", "python") and not args.reward_fn:
        parser.error(f"--judge {args.judge} needs --reward-fn MODULE:FN (or file.py:FN)")
    if args.reward_fn and args.judge not in ("local-reward", "python"):
        parser.error("--reward-fn is used only with --judge local-reward or python")
    if args.judge == "hf" and not (args.judge_model or "model" in args.judge_options):
        parser.error("--judge hf needs --judge-model DIR (a sequence-classification or reward model folder)")
    if args.judge_url and args.judge != "openai":
        parser.error(f"--judge-url is used only with --judge openai (got --judge {args.judge})")
    if args.dataset is not None and args.run_held_out:
        parser.error("--run-held-out takes the data from the run's config.yaml; do not also give --dataset")
    if args.dataset is None and args.prompts is None and not args.run_held_out:
        parser.error("nothing to evaluate: give --dataset (implicit-reward metrics) and/or --prompts (generation)")


def parse_judge_options(items: list[str]) -> dict[str, Any]:
    """--judge-option KEY=VALUE items as a dict (VALUE parsed as YAML: numbers, booleans, strings)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--judge-option must look like KEY=VALUE, got {item!r}")
        try:
            options[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--judge-option {item!r}: VALUE is not valid YAML: {err}") from None
    return options


# --- the run's config.yaml ---------------------------------------------------------------------------------------

def find_run_config(model_dir: str | os.PathLike) -> Path | None:
    """config.yaml in the model folder or up to two folders above (final/, checkpoints/<step>/)."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    for folder in (path, path.parent, path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def load_run_config(path: Path):
    from rpo.train.config import ConfigError, TrainConfig

    try:
        values = yaml.safe_load(path.read_text())
        return TrainConfig.from_dict(values or {}, source=str(path))
    except (yaml.YAMLError, ConfigError, TypeError) as err:
        raise EvaluationError(f"{path}: cannot read the run's config: {err}") from err


def run_loss(config, config_path: Path):
    """The run's loss as it trained: built from its config.yaml by the trainer's own rule
    (rpo.train.config.build_training_loss), for paired or unpaired data as its loss.json records."""
    from rpo.train.config import ConfigError, build_training_loss
    from rpo.train.preflight import LOSS_FILE

    recorded = config_path.parent / LOSS_FILE
    paired = json.loads(recorded.read_text()).get("paired", True) if recorded.is_file() else True
    try:
        return build_training_loss(config, paired=paired)
    except ConfigError as err:
        raise EvaluationError(f"{config_path}: the run's loss: {err}") from err


def run_loss_defaults(loss) -> tuple[str, float | None]:
    """(reward type, beta) of a run's loss: simpo when it needs no reference model; beta of its first term that
    has one."""
    beta = next((term.options["beta"] for _, _, term in loss.terms if "beta" in term.options), None)
    return ("dpo" if loss.needs_reference else "simpo"), beta


def default_model_path() -> str:
    from rpo.models.default_model import default_model_path as embedded

    return str(embedded())


def default_dataset_path() -> str:
    from rpo.train.config import default_dataset_path as embedded

    return str(embedded())


def run_held_out_rows(config, tokenized, source: str):
    """The rows of ``tokenized`` (the run's whole --dataset) that the run held out for evaluation."""
    from rpo.data import held_out_rows, select_rows

    # The seeded split the trainer makes, so the rows are exactly the run's.
    try:
        _, rows = held_out_rows(len(tokenized), config.eval_split_fraction, config.seed)
    except ValueError as error:
        raise EvaluationError(f"--run-held-out {source}: {error}") from None
    return select_rows(tokenized, rows)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the unset options from the run's config.yaml; returns the settings actually used."""
    config_path = find_run_config(args.model)
    config = load_run_config(config_path) if config_path else None
    if config_path:
        logger.info("run config: %s", config_path)
    settings: dict[str, Any] = {"run_config": str(config_path) if config_path else None, "config": config,
                                "loss": run_loss(config, config_path) if config is not None else None}
    if settings["loss"] is not None:
        from rpo.train.reporting import loss_summary

        logger.info("the run trained with %s", loss_summary(settings["loss"]))
    if args.run_held_out:
        if config is None:
            raise EvaluationError(f"--run-held-out: no config.yaml in {args.model} or the two folders above it")
        if not config.eval_dataset and not config.eval_split_fraction > 0:
            raise EvaluationError(f"--run-held-out: the run ({config_path}) held out no data (no --eval-dataset, "
                                  f"--eval-split-fraction 0)")

    reward_type, beta = args.reward_type, args.beta
    if config is not None and (reward_type is None or beta is None):
        loss_reward_type, loss_beta = run_loss_defaults(settings["loss"])
        reward_type = reward_type or loss_reward_type
        beta = beta if beta is not None else loss_beta
    if beta is None:
        logger.info("beta: neither --beta nor a run loss gives one; using %s", DEFAULT_BETA)
        beta = DEFAULT_BETA
    settings["reward_type"] = reward_type or "dpo"
    settings["beta"] = float(beta)

    reference = args.reference
    if reference is None and config is not None:
        reference = config.reference_model or config.model
        if reference is None:
            reference = default_model_path()
            logger.info("reference: the run trained the embedded default model (%s)", reference)
    needs_reference = ((args.dataset is not None or args.run_held_out) and settings["reward_type"] == "dpo") or (
        args.baseline == "reference" and args.judge != "none")
    if reference is None and needs_reference:
        raise EvaluationError(
            f"no --reference given and no config.yaml found in {args.model} or the two folders above it; pass "
            f"--reference DIR (the model training started from), or --reward-type simpo for a reference-free reward")
    settings["reference"] = reference

    def pick(cli_value, field: str, fallback):
        if cli_value is not None:
            return cli_value
        return getattr(config, field) if config is not None else fallback

    settings["max_length"] = pick(args.max_length, "max_length", DEFAULT_MAX_LENGTH)
    settings["max_prompt_length"] = pick(args.max_prompt_length, "max_prompt_length", DEFAULT_MAX_PROMPT_LENGTH)
    if settings["max_prompt_length"] >= settings["max_length"]:
        raise EvaluationError(f"--max-prompt-length ({settings['max_prompt_length']}) must be smaller than "
                              f"--max-length ({settings['max_length']})")
    settings["trust_remote_code"] = bool(pick(args.trust_remote_code, "trust_remote_code", False))
    settings["tokenizer_fallbacks"] = [p for p in ((config.tokenizer if config else None), reference) if p]
    return settings


# --- models --------------------------------------------------------------------------------------------------------

def resolve_device_dtype(device: str | None, dtype: str):
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    return device, torch_dtype


def load_model(name: str, device, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot load model {name!r}: {err}") from err
    check_finite_weights(model, name)
    return model.to(device).eval()


def check_finite_weights(model, name: str) -> None:
    """A model with NaN or infinite weights (e.g. exported from a diverged run) has no meaningful metrics."""
    import torch

    bad = [(param_name, int((~torch.isfinite(param)).sum())) for param_name, param in model.named_parameters()
           if not torch.isfinite(param).all()]
    if bad:
        total = sum(count for _, count in bad)
        raise EvaluationError(f"model {name!r} has {total} non-finite weights (first in {bad[0][0]}), e.g. from a "
                              f"diverged run: it cannot be evaluated")


def check_finite_outputs(records: list[dict], model: str, reference: str | None) -> None:
    """Per-row log-probs must be finite: a NaN / infinite one would make accuracy and margin meaningless."""
    import math

    for record in records:
        for key, value in record.items():
            if key.startswith(("policy_logp_", "reference_logp_")) and not math.isfinite(value):
                which = f"--model {model}" if key.startswith("policy") else f"the reference {reference}"
                raise EvaluationError(f"{which} gives a non-finite log-prob ({value}) for {key.split('_logp_')[1]} "
                                      f"of source row {record['source_row']}: its outputs cannot be evaluated")


def load_tokenizer(candidates: list[str], trust_remote_code: bool):
    from transformers import AutoTokenizer

    errors = []
    for name in candidates:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as err:
            errors.append(f"{name}: {err}")
            continue
        if name != candidates[0]:
            logger.info("tokenizer: %s has none; using %s's", candidates[0], name)
        return tokenizer
    raise EvaluationError("cannot load a tokenizer; tried " + "; ".join(errors))


# --- the evaluation ----------------------------------------------------------------------------------------------

def _write_jsonl(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build_judge(args: argparse.Namespace):
    from rpo.evaluation.judge import LocalRewardJudge, OpenAICompatibleJudge, load_reward_function

    if args.judge == "openai":
        return OpenAICompatibleJudge(args.judge_url, args.judge_model, task=args.judge_task,
                                     api_key=os.environ.get(args.judge_api_key_env) or None,
                                     timeout=args.judge_timeout, retries=args.judge_retries)
    try:
        if args.judge == "local-reward":
            return LocalRewardJudge(load_reward_function(args.reward_fn))
        pointwise = build_pointwise_judge(args)
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    # A pointwise judge in pairwise mode: the higher score wins, equal scores tie.
    return LocalRewardJudge(lambda query, response: pointwise.score([query], [response])[0])


def build_pointwise_judge(args: argparse.Namespace):
    """The pointwise judge --judge names, with the options its flags and --judge-option give."""
    from rpo.evaluation.judges import build_judge

    options = dict(args.judge_options)
    name = args.judge
    if name in ("local-reward", "python"):
        name, options["fn"] = "python", args.reward_fn
    elif name == "openai":
        options.setdefault("url", args.judge_url)
        options.setdefault("model", args.judge_model)
        options.setdefault("api_key", os.environ.get(args.judge_api_key_env) or None)
        options.setdefault("timeout", args.judge_timeout)
        options.setdefault("retries", args.judge_retries)
    elif name == "hf" and args.judge_model:
        options.setdefault("model", args.judge_model)
    try:
        return build_judge(name, **options)
    except ValueError as err:
        raise EvaluationError(f"--judge {args.judge}: {err}") from err


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from rpo.data import load_preference_dataset, tokenize_preference_dataset
    from rpo.data.tokenization import count_truncated_rows
    from rpo.evaluation.generation import PromptRow, generate_responses, load_prompt_file
    from rpo.evaluation.implicit_reward import evaluate_implicit_reward
    from rpo.evaluation.judge import compare_pairwise, render_conversation

    progress = not args.no_progress
    settings = resolve_settings(args)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make CPU matmuls many times slower
    tokenizer = load_tokenizer([args.tokenizer or args.model] + ([] if args.tokenizer else
                                                                 settings["tokenizer_fallbacks"]),
                               settings["trust_remote_code"])
    policy = load_model(args.model, device, dtype, settings["trust_remote_code"])
    reference = None

    def get_reference():
        nonlocal reference
        if reference is None:
            reference = load_model(settings["reference"], device, dtype, settings["trust_remote_code"])
            if reference.config.vocab_size != policy.config.vocab_size:
                raise EvaluationError(f"--reference {settings['reference']} has vocabulary size "
                                      f"{reference.config.vocab_size}, --model {args.model} has "
                                      f"{policy.config.vocab_size}: they must share a tokenizer")
        return reference

    result: dict[str, Any] = {"model": str(args.model), "reference": settings["reference"],
                              "run_config": settings["run_config"]}
    if settings["loss"] is not None:  # what the run trained with, every option resolved
        result["run_loss"] = settings["loss"].describe()
    tokenized = None
    dataset_name, split, columns, skip_bad_rows = args.dataset, args.dataset_split, args.columns, args.skip_bad_rows
    if args.run_held_out:
        config = settings["config"]
        held_out_file = bool(config.eval_dataset)
        dataset_name = config.eval_dataset or config.dataset or str(default_dataset_path())
        split = config.eval_dataset_split if held_out_file else config.dataset_split
        columns, skip_bad_rows = config.columns, config.skip_bad_rows
    if dataset_name is not None:
        try:
            dataset = load_preference_dataset(dataset_name, split, columns=columns, skip_bad_rows=skip_bad_rows)
        except (ValueError, FileNotFoundError) as err:  # the message names the file (and row)
            option = "--dataset" if args.dataset is not None else f"--run-held-out (the run's data {dataset_name})"
            raise EvaluationError(f"{option}: {err}") from err
        tokenized = tokenize_preference_dataset(dataset, tokenizer, max_prompt_length=settings["max_prompt_length"],
                                                max_length=settings["max_length"], progress=progress)
        if args.run_held_out and not held_out_file:
            tokenized = run_held_out_rows(settings["config"], tokenized, str(dataset_name))
            logger.info("--run-held-out: %d rows of %s held out by the run", len(tokenized), dataset_name)
        if args.max_examples is not None and args.max_examples < len(tokenized):
            logger.info("--max-examples %d: evaluating %d of %d rows (%d left out)", args.max_examples,
                        args.max_examples, len(tokenized), len(tokenized) - args.max_examples)
            tokenized.rows = tokenized.rows.select(range(args.max_examples))
        summary, records = evaluate_implicit_reward(
            policy, get_reference() if settings["reward_type"] == "dpo" else None, tokenized,
            beta=settings["beta"], reward_type=settings["reward_type"], batch_size=args.batch_size,
            progress=progress)
        check_finite_outputs(records, args.model, settings["reference"])
        summary["truncated_rows"] = count_truncated_rows(tokenized.rows, tokenized.kind)  # of the evaluated rows
        result.update({"dataset": str(dataset_name), "held_out_of_run": bool(args.run_held_out)}, **summary)
        if args.per_example_output:
            _write_jsonl(args.per_example_output, records)

    prompt_rows: list[PromptRow] | None = None
    if args.prompts is not None:
        try:
            prompt_rows = load_prompt_file(args.prompts, args.baseline_field)
        except (ValueError, FileNotFoundError) as err:
            raise EvaluationError(f"--prompts: {err}") from err
    elif args.judge != "none":
        # The data set's prompts, its chosen (unpaired: desirable) answers as the baseline.
        if tokenized.paired:
            prompt_rows = [PromptRow(r["prompt"], "\n\n".join(m["content"] for m in r["chosen"]), r["source_row"])
                           for r in tokenized.rows]
        else:
            prompt_rows = [PromptRow(r["prompt"], "\n\n".join(m["content"] for m in r["completion"]),
                                     r["source_row"]) for r in tokenized.rows if r["label"]]
    if prompt_rows is not None:
        if args.max_prompts is not None and args.max_prompts < len(prompt_rows):
            logger.info("--max-prompts %d: answering %d of %d prompts", args.max_prompts, args.max_prompts,
                        len(prompt_rows))
            prompt_rows = prompt_rows[: args.max_prompts]
        if args.judge != "none" and args.judge_mode == "pointwise":
            result.update(evaluate_pointwise(args, settings, policy, get_reference(), tokenizer, prompt_rows,
                                             str(args.prompts or dataset_name), progress))
            return result
        generation_options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  max_prompt_length=settings["max_prompt_length"],
                                  batch_size=args.generation_batch_size, seed=args.seed, progress=progress)
        prompts = [row.prompt for row in prompt_rows]
        answers = generate_responses(policy, tokenizer, prompts, **generation_options)
        baselines: list[str | None] = [row.baseline for row in prompt_rows]
        if args.judge != "none" and args.baseline == "reference":
            baselines = generate_responses(get_reference(), tokenizer, prompts, **generation_options)
        result["generation"] = {"prompts": str(args.prompts or dataset_name), "n": len(prompts),
                                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                "top_p": args.top_p if args.temperature > 0 else None,
                                "output": args.generations_output}
        if args.generations_output:
            _write_jsonl(args.generations_output, [
                {"source_row": row.source_row, "prompt": row.prompt, "response": answer, "baseline": baseline}
                for row, answer, baseline in zip(prompt_rows, answers, baselines)])
        if args.judge != "none":
            missing = [row.source_row for row, b in zip(prompt_rows, baselines) if b is None]
            if missing:
                raise EvaluationError(
                    f"--baseline chosen: {len(missing)} prompts have no {args.baseline_field!r} answer (rows "
                    f"{missing[:5]}{'...' if len(missing) > 5 else ''}); add it, set --baseline-field, or use "
                    f"--baseline reference")
            judge = _build_judge(args)
            judged_records, summary = compare_pairwise(prompts, answers, baselines, judge, seed=args.seed,
                                                       progress=progress)
            result["judge"] = {"mode": args.judge, "task": args.judge_task, "baseline": args.baseline,
                               "model": args.judge_model if args.judge == "openai" else None,
                               "reward_fn": args.reward_fn, "seed": args.seed, **summary.to_dict()}
            result["win_rate"] = summary.win_rate
            result["win_rate_ci"] = [summary.ci_low, summary.ci_high]
            if args.judgements_output:
                _write_jsonl(args.judgements_output, [
                    {"source_row": prompt_rows[r.index].source_row, "query": render_conversation(prompts[r.index]),
                     "candidate_position": r.candidate_position, "verdict": r.verdict, "outcome": r.outcome,
                     "judge_output": r.judge_output} for r in judged_records])
    return result


def _prompts_digest(prompts: list) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _reference_key(args, settings, prompts, sampling) -> dict:
    """What decides the reference's samples and scores (the --reference-samples file must match it)."""
    key = {"reference": str(settings["reference"]), "prompts": _prompts_digest(prompts), "judge": args.judge,
           "judge_options": {k: v for k, v in args.judge_options.items() if k != "api_key"},
           "reward_fn": args.reward_fn, "judge_model": args.judge_model, "dtype": args.dtype,
           **{k: v for k, v in sampling.items() if k not in ("progress", "batch_size")}}
    return json.loads(json.dumps(key))


def _reference_samples(args, settings, reference, tokenizer, prompts, judge, sampling, progress):
    """The reference's samples and scores: from --reference-samples when it matches, else sampled (and written)."""
    from rpo.evaluation.judges import checked_scores
    from rpo.evaluation.sampling import Sample, sample_responses

    key = _reference_key(args, settings, prompts, sampling)
    path = Path(args.reference_samples) if args.reference_samples else None
    if path is not None and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("settings") == json.loads(json.dumps(key)):
            rows = [json.loads(line) for line in lines[1:]]
            logger.info("--reference-samples: %d reference samples read from %s", len(rows), path)
            scores = [float("nan") if r["score"] is None else r["score"] for r in rows]
            return [Sample(**{k: r[k] for k in Sample.__dataclass_fields__}) for r in rows], scores
        changed = sorted(k for k in key if header.get("settings", {}).get(k) != json.loads(json.dumps(key))[k])
        logger.info("--reference-samples %s was written with other settings (%s): sampling the reference again",
                    path, ", ".join(changed))
    samples = sample_responses(reference, tokenizer, prompts, **sampling)
    scores = checked_scores(judge, [prompts[s.prompt_index] for s in samples], [s.text for s in samples])
    if path is not None:
        rows = [{**s.to_dict(), "score": None if math.isnan(v) else v} for s, v in zip(samples, scores)]
        _write_jsonl(str(path), [{"settings": key}] + rows)
    return samples, scores


def evaluate_pointwise(args, settings, policy, reference, tokenizer, prompt_rows, prompts_name: str,
                       progress: bool) -> dict[str, Any]:
    """--judge-mode pointwise: the frontier point of the policy (rpo.evaluation.frontier)."""
    from rpo.evaluation.frontier import frontier_point
    from rpo.evaluation.implicit_reward import sequence_logprobs
    from rpo.evaluation.judges import checked_scores
    from rpo.evaluation.sampling import encode_prompts, sample_responses, sample_sequences

    judge = build_pointwise_judge(args)
    prompts = [row.prompt for row in prompt_rows]
    sampling = dict(samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    max_prompt_length=settings["max_prompt_length"], batch_size=args.generation_batch_size,
                    progress=progress)
    samples = sample_responses(policy, tokenizer, prompts, **sampling)
    scores = checked_scores(judge, [prompts[s.prompt_index] for s in samples], [s.text for s in samples])
    same_model = Path(args.model).resolve() == Path(str(settings["reference"])).resolve()
    if same_model and args.reference_samples and not Path(args.reference_samples).is_file():
        # The reference evaluated against itself: its samples are the policy's (same seeds, same model).
        _write_jsonl(args.reference_samples, [{"settings": _reference_key(args, settings, prompts, sampling)}] + [
            {**s.to_dict(), "score": None if math.isnan(v) else v} for s, v in zip(samples, scores)])
    reference_samples, reference_scores = _reference_samples(args, settings, reference, tokenizer, prompts, judge,
                                                             sampling, progress)
    reference_logps = None
    if args.kl and same_model:
        reference_logps = [s.logp for s in samples]  # log pi - log pi_ref = 0 for every sample
    elif args.kl:
        encoded = encode_prompts(tokenizer, prompts, settings["max_prompt_length"])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        reference_logps = sequence_logprobs(reference, sample_sequences(encoded, samples), pad_id,
                                            args.batch_size, "reference log-probs" if progress else None)[0].tolist()
    point = frontier_point(len(prompts), samples, scores, reference_samples, reference_scores, reference_logps)
    if args.samples_output:
        rows = []
        for model_name, group, group_scores in (("policy", samples, scores),
                                                ("reference", reference_samples, reference_scores)):
            for index, (sample, score) in enumerate(zip(group, group_scores)):
                row = {"model": model_name, "source_row": prompt_rows[sample.prompt_index].source_row,
                       **sample.to_dict(), "score": None if math.isnan(score) else score}
                if model_name == "policy" and reference_logps is not None:
                    row["reference_logp"] = reference_logps[index]
                rows.append(row)
        _write_jsonl(args.samples_output, rows)
    point["judge"] = {"name": args.judge, "options": {k: v for k, v in args.judge_options.items() if k != "api_key"},
                      "reward_fn": args.reward_fn, "model": args.judge_model}
    point["sampling"] = {"prompts": prompts_name, "max_new_tokens": args.max_new_tokens,
                         "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                         "samples_output": args.samples_output, "reference_samples": args.reference_samples}
    out: dict[str, Any] = {"pointwise": point, "judge_score": point["score"]["mean"],
                           "judge_score_ci": [point["score"]["ci_low"], point["score"]["ci_high"]]}
    if "kl" in point:
        out["kl"] = point["kl"]["mean"]
        out["kl_ci"] = [point["kl"]["ci_low"], point["kl"]["ci_high"]]
    return out


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}  reference {result.get('reference')}"]
    if "reward_accuracy" in result:
        lines.append(
            f"held-out implicit reward ({result['reward_type']}, beta {result['beta']:g}) on {result['n']} rows: "
            f"accuracy {result['reward_accuracy']:.4f}, margin {result['reward_margin']:.4f}; policy log-prob "
            f"chosen {result['policy_logp_chosen']:.2f} vs rejected {result['policy_logp_rejected']:.2f}")
    if "judge" in result:
        judge = result["judge"]
        lines.append(
            f"win rate vs {judge['baseline']} ({judge['mode']} judge, {judge['n']} comparisons, "
            f"{judge['wins']}W/{judge['ties']}T/{judge['losses']}L, {judge['invalid']} unreadable): "
            f"{judge['win_rate']:.3f}, 95% Wilson CI [{judge['ci_low']:.3f}, {judge['ci_high']:.3f}]")
    elif "generation" in result:
        lines.append(f"generated {result['generation']['n']} answers")
    if "pointwise" in result:
        from rpo.evaluation.frontier import format_interval

        point = result["pointwise"]
        text = (f"judge {point['judge']['name']} on {point['prompts']} prompts x {point['samples_per_prompt']:g} "
                f"samples: policy {format_interval(point['score'])}, reference "
                f"{format_interval(point.get('reference_score'))}, difference (paired by prompt) "
                f"{format_interval(point.get('difference'))}")
        if "kl" in point:
            text += f"; KL {format_interval(point['kl'])} nats"
        lines.append(text + f"; {point['cut_off']} of {point['samples']} samples cut off (95% t intervals)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "rpo-eval") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rpo.evaluation.judge import JudgeError

    try:
        result = evaluate(args)
    except (EvaluationError, JudgeError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(text + "\n")
    print(format_summary(result))
    if args.output_json:
        print(f"metrics written to {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
