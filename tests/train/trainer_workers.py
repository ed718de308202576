"""Worker processes for tests/train/test_trainer.py: tiny assets, and Trainer runs on 1 or 2 gloo ranks.

Each launch costs seconds of imports, so one launch runs several cases (`python trainer_workers.py CASES WORKDIR`,
started by tests/multirank.py: `start(world_size, cases, workdir)`). Workers only record (safetensors /
metrics.jsonl); the test asserts.

Assets (built by the parent test with `build_assets`): a byte-level BPE tokenizer trained on the shared data (with
a chat template), a tiny random LLaMA saved as an HF folder, and slices of ../shared/data/paired.jsonl.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Dict, Sequence

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

# A ChatML-style template, so the data's chat-template path is exercised (the tiny tokenizer has none built in).
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 400
MAX_LENGTH, MAX_PROMPT_LENGTH = 48, 24
EQUIVALENCE_ROWS, RUN_ROWS, UNPAIRED_ROWS = 8, 12, 12
SGD_LR = 1.0


# ============================================================================================== assets ======
def build_assets(workdir: Path) -> Dict[str, Path]:
    """Tokenizer + tiny LLaMA folder + data slices under workdir; returns their paths."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    workdir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (SHARED_DATA / "paired.jsonl").read_text().splitlines()[:RUN_ROWS]]
    paths = {"model": workdir / "tiny-llama", "equivalence_data": workdir / f"paired{EQUIVALENCE_ROWS}.jsonl",
             "run_data": workdir / f"paired{RUN_ROWS}.jsonl", "cache": workdir / "cache"}
    # Chosen answers of unequal lengths (most answers fill MAX_LENGTH), so that token means (sft) differ between
    # micro-batches and ranks.
    equivalence = [dict(r, chosen=r["chosen"][:-1] + [dict(r["chosen"][-1],
                                                           content=r["chosen"][-1]["content"][:12 + 9 * i])])
                   for i, r in enumerate(rows[:EQUIVALENCE_ROWS])]
    paths["equivalence_data"].write_text("".join(json.dumps(r) + "\n" for r in equivalence))
    paths["run_data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    unpaired = (SHARED_DATA / "unpaired.jsonl").read_text().splitlines()[:UNPAIRED_ROWS]
    paths["unpaired_data"] = workdir / f"unpaired{UNPAIRED_ROWS}.jsonl"
    paths["unpaired_data"].write_text("".join(line + "\n" for line in unpaired))

    texts = [m["content"] for r in rows for key in ("prompt", "chosen", "rejected") for m in r[key]]
    texts += [m["content"] for line in unpaired for key in ("prompt", "completion") for m in json.loads(line)[key]]
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
                         rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=False, initializer_range=0.1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norm weights away from 1, so a misplaced norm gradient shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    return paths


def base_config(workdir: Path, name: str, **overrides):
    """A TrainConfig for the tiny assets: exact (SGD, fp32, no clipping), quiet, one step unless overridden."""
    from rpo.train import TrainConfig

    values = dict(model=str(workdir / "tiny-llama"), dataset=str(workdir / f"paired{EQUIVALENCE_ROWS}.jsonl"),
                  cache_dir=str(workdir / "cache"), output_dir=str(workdir / "runs" / name), max_length=MAX_LENGTH,
                  max_prompt_length=MAX_PROMPT_LENGTH, global_batch_size=EQUIVALENCE_ROWS,
                  micro_batch_size=EQUIVALENCE_ROWS, optimizer="sgd", lr=SGD_LR, grad_clip=0.0, max_steps=1,
                  eval_split_fraction=0.0, save_every=0, save_final=False, progress_bar=False, seed=0,
                  dtype="float32")
    values.update(overrides)
    return TrainConfig(**values)


# ============================================================================================== launch ======
def start(world_size: int, cases: Sequence[str], workdir: Path):
    """Start `world_size` ranks of this module running `cases` (tests/multirank.py); `.wait()` gives the result,
    whose `.report()` holds every rank's log tail."""
    import multirank

    return multirank.start(Path(__file__).resolve(), world_size, args=[",".join(cases), workdir],
                           log_dir=Path(workdir) / "logs", name="+".join(cases))


# ============================================================================================== worker ======
def _record(workdir: Path, name: str, trainer, summary) -> None:
    """Rank 0 writes the HF-named weights after training and the run's metrics."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from rpo.models import gather_hf_state

    state = gather_hf_state(trainer.policy)  # collective over TP
    if dist.get_rank() == 0:
        out = workdir / "results"
        out.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(
            {"history": trainer.history, "summary": summary, "reference_model_loaded": trainer.reference is not None,
             "dtype": str(next(trainer.policy.parameters()).dtype),
             # the global contrast over micro-batches: graphs kept (rpo.train.scale.kept_graphs), last step's modes
             "kept_graphs": trainer.kept_graphs, "last_kept": list(trainer.last_kept)}, default=str))


def _run(workdir: Path, name: str, **overrides):
    from rpo.train import Trainer

    trainer = Trainer(base_config(workdir, name, **overrides))
    summary = trainer.fit()
    _record(workdir, name, trainer, summary)
    return trainer


# Rows normalised to 1 (the paper's; --global-contrast's own default is reference_columns), as test_trainer's
# float64 reference computes them.
RPO = dict(loss="rpo", global_contrast=True, beta=0.1, weighting="embedding", tau=0.5, weight_normalization="row")
# A batch-coupled global term plus two separable ones, a row mean (dpo) and a token mean (sft): the trainer weights
# each differently under micro-batching and DP averaging.
COMBO = dict(RPO, loss="rpo+0.5*dpo+0.2*sft")
LOSSES = {"dpo": dict(loss="dpo", beta=0.1), "rpo": RPO, "combo": COMBO, "kto": dict(loss="kto", beta=0.1)}


def case_equivalence(workdir: Path, tp: int, dp: int) -> None:
    """One SGD step of dpo, rpo --global-contrast and rpo+0.5*dpo+0.2*sft on the 8-pair batch at this topology, plus
    the micro-batched (gradient accumulation / two-pass) variants."""
    tag = f"tp{tp}dp{dp}"
    whole = EQUIVALENCE_ROWS // dp  # one micro-batch per rank
    for name in ("dpo", "rpo", "combo"):
        _run(workdir, f"{name}-{tag}", tensor_parallel=tp, micro_batch_size=whole, **LOSSES[name])
        if tp == 1:  # two micro-batches per rank
            _run(workdir, f"{name}-{tag}-accum", micro_batch_size=whole // 2, **LOSSES[name])


def case_unpaired(workdir: Path, dp: int) -> None:
    """kto and rpo --global-contrast on 12 unpaired examples: one micro-batch on one rank, or two per rank on two
    ranks (each rank then holds its own numbers of desirable and undesirable examples)."""
    micro, suffix = (UNPAIRED_ROWS, "tp1dp1") if dp == 1 else (UNPAIRED_ROWS // (2 * dp), f"tp1dp{dp}-accum")
    for name in ("kto", "rpo"):
        _run(workdir, f"{name}-unpaired-{suffix}", dataset=str(workdir / f"unpaired{UNPAIRED_ROWS}.jsonl"),
             global_batch_size=UNPAIRED_ROWS, micro_batch_size=micro, **LOSSES[name])


def case_variants(workdir: Path) -> None:
    """Two dpo steps with the live reference model, with --precompute-reference, and in bfloat16."""
    common = dict(loss="dpo", beta=0.1, max_steps=2, lr=0.5)
    _run(workdir, "dpo-live-reference", **common)
    _run(workdir, "dpo-precomputed-reference", precompute_reference=True, **common)
    _run(workdir, "dpo-bf16", dtype="bfloat16", **common)


# Related-prompt batches here, so the killed-and-resumed run also shows that --batching related resumes exactly.
RESUME = dict(RPO, dataset=None, optimizer="rmsprop", lr=3e-3, max_steps=6, global_batch_size=4,
              micro_batch_size=1, save_every=2, keep_checkpoints=0, grad_clip=1.0, eval_split_fraction=0.25,
              eval_every=3, batching="related", related_fraction=0.5)


def _resume_config(workdir: Path, name: str, **extra):
    values = dict(RESUME, dataset=str(workdir / f"paired{RUN_ROWS}.jsonl"), **extra)
    return base_config(workdir, name, **values)


class KillAt:
    """SIGKILL this process right after step `step` (every rank does the same: the launch dies mid-run)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, record):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def case_resume_reference(workdir: Path) -> None:
    from rpo.train import Trainer

    trainer = Trainer(_resume_config(workdir, "resume-reference"))
    _record(workdir, "resume-reference", trainer, trainer.fit())


def case_resume_killed(workdir: Path) -> None:
    from rpo.train import Trainer

    Trainer(_resume_config(workdir, "resume"), callbacks=[KillAt(3)]).fit()


def case_resume_continue(workdir: Path) -> None:
    from rpo.train import Trainer

    trainer = Trainer(_resume_config(workdir, "resume", resume="latest"))
    _record(workdir, "resume", trainer, trainer.fit())


def case_run3(workdir: Path) -> None:
    """A 3-step run with evaluation, checkpoints, final/ and TensorBoard events (the outputs the CLI promises)."""
    from rpo.train import Trainer

    config = base_config(workdir, "run3", dataset=str(workdir / f"paired{RUN_ROWS}.jsonl"), max_steps=3,
                         global_batch_size=4, micro_batch_size=2, eval_split_fraction=0.25, eval_every=2,
                         save_every=2, save_final=True, optimizer="rmsprop", lr=1e-3, report_to="tensorboard", **{
                             k: v for k, v in RPO.items() if k != "global_contrast"})
    trainer = Trainer(config)
    summary = trainer.fit()
    _record(workdir, "run3", trainer, summary)


def case_overwrite(workdir: Path) -> None:
    """An rpo run with checkpoints and final/, then a dpo run with --overwrite in the same folder."""
    from rpo.train import Trainer

    first = base_config(workdir, "overwrite", dataset=str(workdir / f"paired{RUN_ROWS}.jsonl"), max_steps=2,
                        global_batch_size=4, micro_batch_size=4, save_every=1, save_final=True, **RPO)
    Trainer(first).fit()
    _run(workdir, "overwrite", loss="dpo", beta=0.1, overwrite=True)


def case_smollm2(workdir: Path) -> None:
    """A few rpo steps of the real SmolLM2-135M-Instruct (the embedded default) on 8 pairs of the shared data,
    the same 8 pairs every step, so the logged metrics show what the updates did to that batch."""
    from rpo.train import Trainer, TrainConfig

    rows = (SHARED_DATA / "paired.jsonl").read_text().splitlines()[:8]
    (workdir / "paired-smollm2.jsonl").write_text("".join(line + "\n" for line in rows))
    config = TrainConfig(dataset=str(workdir / "paired-smollm2.jsonl"), cache_dir=str(workdir / "cache"),
                         output_dir=str(workdir / "runs" / "smollm2"), loss="rpo", global_contrast=True,
                         global_batch_size=8, micro_batch_size=8, max_length=128, max_prompt_length=64,
                         optimizer="rmsprop", lr=1e-5, max_steps=4, eval_split_fraction=0.0, save_every=0,
                         save_final=False, progress_bar=False, seed=0)
    trainer = Trainer(config)
    _record(workdir, "smollm2", trainer, trainer.fit())


# Cases that run once per topology the launch's world size allows: (tp, dp) or (dp,).
TOPOLOGIES = {"equivalence": {1: [(1, 1)], 2: [(2, 1), (1, 2)]}, "unpaired": {1: [(1,)], 2: [(2,)]}}


def main(cases: str, workdir: str) -> None:
    import logging

    from rpo.models import teardown

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(name)s: %(message)s")
    workdir = Path(workdir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for case in cases.split(","):
        for arguments in TOPOLOGIES.get(case, {}).get(world, [()]):
            globals()[f"case_{case}"](workdir, *arguments)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
