"""rpo's Megatron trainer on trl_tiny's model and data (launched by tests/multirank.py, 1 rank), for
test_trl_integration.py's comparison with RPOTrainer.

    python trainer_match_worker.py WORKDIR CASES_JSON

WORKDIR holds what `write_assets` wrote: the tiny float64 LLaMA (policy, with the chat-template tokenizer) and its
reference as HF folders, and the pairs as JSONL. Each case {"name", "options"} trains one SGD step of the whole
data set in one micro-batch; the first step's logged loss goes to WORKDIR/results/<name>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_tiny  # noqa: E402

MAX_LENGTH, MAX_PROMPT_LENGTH = trl_tiny.MAX_POSITIONS, trl_tiny.MAX_POSITIONS // 2


def write_assets(workdir: Path, pairs: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    policy, reference = trl_tiny.tiny_llama(0), trl_tiny.tiny_llama(1)
    policy.save_pretrained(workdir / "policy")
    trl_tiny.chat_tokenizer().save_pretrained(workdir / "policy")
    reference.save_pretrained(workdir / "reference")
    rows = trl_tiny.conversational_dataset(pairs)
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(workdir: str, cases: str) -> None:
    from rpo.models import teardown
    from rpo.train import TrainConfig
    from rpo.train.trainer import Trainer

    workdir = Path(workdir)
    rows = len((workdir / "pairs.jsonl").read_text().splitlines())
    for case in json.loads(cases):
        config = TrainConfig(model=str(workdir / "policy"), reference_model=str(workdir / "reference"),
                             dataset=str(workdir / "pairs.jsonl"), cache_dir=str(workdir / "cache"),
                             output_dir=str(workdir / "runs" / case["name"]), global_batch_size=rows,
                             micro_batch_size=rows, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                             optimizer="sgd", lr=1e-2, grad_clip=0.0, max_steps=1, eval_split_fraction=0.0,
                             save_every=0, save_final=False, progress_bar=False, seed=0, dtype="float32",
                             **case["options"])
        trainer = Trainer(config)
        trainer.fit()
        out = workdir / "results"
        out.mkdir(exist_ok=True)
        (out / f"{case['name']}.json").write_text(json.dumps({"loss": trainer.history[0]["loss"]}))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
