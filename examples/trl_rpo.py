"""RPO with LoRA in TRL: rpo's RPOTrainer (a trl.DPOTrainer with the rpo loss) on the embedded default model.

TRL's own script style: its config classes (RPOConfig = DPOConfig + the rpo loss, ModelConfig for the model and
LoRA) parsed by TrlParser, so every DPOConfig / ModelConfig flag and `--config run.yaml` work. The defaults are a
small CPU run (8 steps of 4 pairs, max_length 192; about 3 minutes for 3 steps on 2 cores; TRL drops the pairs
whose prompt alone fills max_length): SmolLM2-135M-Instruct (rpo.models.default_model), ../shared/data/paired.jsonl
with a seeded 10% held out, LoRA r=16 on every linear layer, rpo with prompt-embedding weights; the reference is
the base model with the adapter disabled (so before training every reward is 0). At the end: the held-out
metrics (TRL's eval_rewards/accuracies is the held-out preference accuracy) and the adapter in --output_dir.

    python examples/trl_rpo.py                                      # the CPU defaults
    python examples/trl_rpo.py --rpo_loss simpo-rpo --beta 2.0 --max_steps 50
    accelerate launch --num_processes 2 examples/trl_rpo.py --global_contrast   # contrast over both ranks

Needs TRL (`pip install 'rpo[trl]'`, or the environment of `make trl-venv`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rpo.integrations.trl import RPOConfig, RPOTrainer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "paired.jsonl"
LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A few minutes on a CPU; any flag overrides them.
CPU_DEFAULTS = dict(output_dir="runs/trl_rpo", max_steps=8, per_device_train_batch_size=4,
                    per_device_eval_batch_size=4, learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0,
                    max_length=192, beta=0.1, gradient_checkpointing=False, logging_steps=5, eval_strategy="no",
                    save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                    use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=LINEAR_LAYERS,
                    dtype="float32")


@dataclass
class ScriptArguments:
    """The data set and its held-out split (rpo.data.held_out_rows, the split of rpo's own trainer)."""

    dataset_path: str = field(default=str(DEFAULT_DATA), metadata={
        "help": "A JSON-lines preference file (prompt, chosen, rejected; strings or messages)."})
    eval_split_fraction: float = field(default=0.1, metadata={"help": "Fraction of the rows held out."})
    max_eval_pairs: int | None = field(default=None, metadata={"help": "At most this many held-out pairs."})


def load_splits(script_args: ScriptArguments, seed: int):
    from datasets import load_dataset

    from rpo.data import held_out_rows

    dataset = load_dataset("json", data_files=script_args.dataset_path, split="train")
    train_rows, eval_rows = held_out_rows(len(dataset), script_args.eval_split_fraction, seed)
    eval_rows = eval_rows[:script_args.max_eval_pairs]
    return dataset.select(train_rows), dataset.select(eval_rows)


def main(script_args: ScriptArguments, training_args: RPOConfig, model_args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from rpo.models.default_model import default_model_path

    started = time.perf_counter()
    torch.set_flush_denormal(True)
    model_path = model_args.model_name_or_path or str(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, model_args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_dataset, eval_dataset = load_splits(script_args, training_args.seed)
    trainer = RPOTrainer(model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(training_args.output_dir)
    # TRL drops the pairs whose prompt alone fills max_length: count what it kept.
    summary = {"loss": trainer.rpo_loss.name, "model": model_path, "train_pairs": len(trainer.train_dataset),
               "held_out_pairs": len(trainer.eval_dataset), "steps": trainer.state.global_step,
               "held_out_accuracy": after.get("eval_rewards/accuracies"),
               "held_out_margin": after.get("eval_rewards/margins"), "held_out_loss": after.get("eval_loss"),
               "adapter": training_args.output_dir, "wall_s": round(time.perf_counter() - started, 1)}
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=2))
        Path(training_args.output_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_parser():
    from trl import ModelConfig, TrlParser

    parser = TrlParser((ScriptArguments, RPOConfig, ModelConfig))
    parser.set_defaults(**CPU_DEFAULTS)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
