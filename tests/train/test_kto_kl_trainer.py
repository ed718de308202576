"""KTO's KL reference point in the trainer: mismatched pairs over the global batch (each rank scoring its own rows'
pairs), z all-reduced over the DP group.

The reference model is the tiny LLaMA with seeded noise (tests/train/kto_kl_workers.py), so z > 0. Two launches
(1 rank; 2 ranks), each with one and two micro-batches per rank; the test recomputes z and the step in float64
with Hugging Face's LLaMA, pairing the rows as the docstring of rpo.data.kto_pairs says, over the global batch
in the order the ranks recorded (every rank's desirable rows, then every rank's undesirable rows).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kto_kl_workers as workers
from rpo.train import ConfigError, TrainConfig
from test_trainer import BETA, check_step, result, sequence_logp64
from trainer_workers import MAX_LENGTH, MAX_PROMPT_LENGTH, UNPAIRED_ROWS

Z_TOLERANCE = dict(rel=1e-5, abs=1e-5)  # float32 log-probs of ~40-token sequences against float64


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("kto_kl")
    workers.build_assets(workdir)
    started = [workers.start(1, workdir), workers.start(2, workdir)]
    for launch in started:
        launch.wait().check()
    return workdir


def rank_records(workdir: Path, name: str, world: int):
    return [json.loads((workdir / "results" / f"{name}-rank{rank}.json").read_text()) for rank in range(world)]


# ================================================================================= float64 reference =====
class Float64Kto:
    """The unpaired data, tokenised by rpo.data, and float64 HF copies of the policy and the reference."""

    def __init__(self, workdir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rpo.data import load_preference_dataset, tokenize_preference_dataset

        tokenizer = AutoTokenizer.from_pretrained(workdir / "tiny-llama")
        tokenized = tokenize_preference_dataset(load_preference_dataset(workdir / workers.UNPAIRED_DATA), tokenizer,
                                                max_prompt_length=MAX_PROMPT_LENGTH, max_length=MAX_LENGTH)
        self.labels = list(tokenized.rows["label"])
        self.ids = list(tokenized.rows["completion_input_ids"])
        self.masks = list(tokenized.rows["completion_loss_mask"])
        load = lambda folder: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            workdir / folder, dtype=torch.float64, attn_implementation="eager")
        self.policy, self.reference = load("tiny-llama"), load(workers.REFERENCE_MODEL)
        self.reference.requires_grad_(False)

    def split(self, row: int):
        """(prompt ids, completion ids) of a dataset row: prompt tokens, then response tokens."""
        start = self.masks[row].index(True)
        return self.ids[row][:start], self.ids[row][start:]

    def log_ratio(self, ids, mask) -> torch.Tensor:
        """log π(y|x) − log π_ref(y|x) of one sequence (gradient through the policy only)."""
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        return sequence_logp64(self.policy, ids, mask) - sequence_logp64(self.reference, ids, mask)

    @torch.no_grad()
    def mismatched_log_ratios(self, row_ids) -> torch.Tensor:
        """Row r of a batch with the completion of row (r + 1) mod R, cut to max_length on the right."""
        ratios = []
        for r, row in enumerate(row_ids):
            prompt = self.split(row)[0]
            completion = self.split(row_ids[(r + 1) % len(row_ids)])[1][:MAX_LENGTH - len(prompt)]
            ratios.append(self.log_ratio(prompt + completion, [False] * len(prompt) + [True] * len(completion)))
        return torch.stack(ratios)

    def step(self, rank_batches):
        """(z, per-rank sums of mismatched log-ratios, loss, {HF name: gradient}) of one step whose rank batches
        are `rank_batches` ([{"row_ids", "num_chosen"}] per rank): KTO over every rank's rows with
        z = max(0, mean over the global batch's pairs), detached."""
        chosen = [(rank, row) for rank, b in enumerate(rank_batches) for row in b["row_ids"][:b["num_chosen"]]]
        rejected = [(rank, row) for rank, b in enumerate(rank_batches) for row in b["row_ids"][b["num_chosen"]:]]
        order = chosen + rejected  # the global batch's order
        every = self.mismatched_log_ratios([row for _, row in order])
        ratios = [every[[i for i, (rank, _) in enumerate(order) if rank == r]] for r in range(len(rank_batches))]
        z = max(0.0, every.mean().item())
        terms = []
        for batch in rank_batches:
            for position, row in enumerate(batch["row_ids"]):
                desirable = position < batch["num_chosen"]
                assert self.labels[row] == desirable  # the trainer's layout: desirable rows first
                reward = self.log_ratio(self.ids[row], self.masks[row])
                terms.append(1 - torch.sigmoid(BETA * ((reward - z) if desirable else (z - reward))))
        loss = torch.stack(terms).mean()
        self.policy.zero_grad()
        loss.backward()
        grads = {name: p.grad.float() for name, p in self.policy.named_parameters()}
        return z, [r.sum().item() for r in ratios], loss.item(), grads


@pytest.fixture(scope="module")
def float64(launches):
    return Float64Kto(launches)


def check_kl_run(workdir: Path, float64: Float64Kto, name: str, world: int) -> float:
    """The step of run `name` equals the float64 one with the pairs each rank formed, every loss call on every
    rank used the same z and counted every row's pair; returns that z."""
    records = rank_records(workdir, name, world)
    assert all(len(record["batches"]) == 1 for record in records)  # one step
    rank_batches = [record["batches"][0] for record in records]
    assert sorted(row for batch in rank_batches for row in batch["row_ids"]) == list(range(UNPAIRED_ROWS))
    z, rank_sums, loss, grads = float64.step(rank_batches)
    assert z > 1e-2, "the reference differs too little from the policy: z = 0 cannot tell the wiring"
    calls = [call for record in records for call in record["calls"]]
    assert len(calls) == world * len(records[0]["calls"])  # every rank called the loss as often
    assert {call["kl"] for call in calls} == {calls[0]["kl"]}, "ranks or micro-batches used different z"
    assert calls[0]["kl"] == pytest.approx(z, **Z_TOLERANCE), name
    assert {call["kl_pairs"] for call in calls} == {UNPAIRED_ROWS}
    for record, batch, rank_sum in zip(records, rank_batches, rank_sums):
        for call in record["calls"]:  # each rank scored the pairs of its own rows
            assert call["rank_pairs"] == len(batch["row_ids"])
            assert call["rank_log_ratio_sum"] == pytest.approx(rank_sum, **Z_TOLERANCE), name
    logged = result(workdir, name)[1]["history"][0]
    assert logged["kl"] == pytest.approx(z, **Z_TOLERANCE) and logged["kl_pairs"] == UNPAIRED_ROWS
    check_step(workdir, name, (loss, grads))
    return calls[0]["kl"]


def test_one_rank_step_with_kl_equals_float64_reference(launches, float64):
    """One rank, one and two micro-batches: z comes from the whole rank batch, not from the micro-batch."""
    z_whole = check_kl_run(launches, float64, "kto-kl-dp1", 1)
    z_accum = check_kl_run(launches, float64, "kto-kl-dp1-accum", 1)
    assert z_accum == pytest.approx(z_whole, **Z_TOLERANCE)


def test_two_ranks_pair_over_the_global_batch_and_share_z(launches, float64):
    """DP=2: the pairs are those of the global batch, so z is one rank's z of the same 12 rows, on both ranks."""
    z_one_rank = check_kl_run(launches, float64, "kto-kl-dp1", 1)
    for name in ("kto-kl-dp2", "kto-kl-dp2-accum"):
        z = check_kl_run(launches, float64, name, 2)
        assert z == pytest.approx(z_one_rank, **Z_TOLERANCE)
        # Pairing within each rank's 6 rows instead would give another z: the checks above tell them apart.
        rank_batches = [record["batches"][0] for record in rank_records(launches, name, 2)]
        within = torch.cat([float64.mismatched_log_ratios(batch["row_ids"]) for batch in rank_batches])
        assert abs(max(0.0, within.mean().item()) - z) > 1e-3


def test_kto_kl_refuses_precomputed_reference():
    """KTO's mismatched pairs need the live reference model each step: --precompute-reference is refused."""
    from rpo.train.config import build_training_loss

    for paired in (True, False):
        with pytest.raises(ConfigError, match="--precompute-reference"):
            build_training_loss(TrainConfig(loss="kto", precompute_reference=True), paired=paired)
    assert build_training_loss(TrainConfig(loss="dpo", precompute_reference=True)).name == "dpo"


def test_a_reference_of_another_vocabulary_is_refused_naming_the_option(launches):
    """A --reference-model must score the policy's token ids: 8 more vocabulary rows are a ConfigError."""
    from transformers import AutoConfig

    record = json.loads((launches / "results" / "kto-other-vocabulary.json").read_text())
    policy_vocab = AutoConfig.from_pretrained(launches / "tiny-llama").vocab_size
    assert record["error"] is not None
    assert record["error"].startswith(f"--reference-model {launches / workers.OTHER_VOCABULARY_MODEL}: its vocabulary "
                                      f"has {policy_vocab + workers.EXTRA_VOCABULARY} tokens")
    assert f"the policy's ({launches / 'tiny-llama'}) {policy_vocab};" in record["error"]
