"""The training loop: `Trainer(TrainConfig(...)).fit()` on one process or under torchrun (TP x DP).

The trainer keeps the set-up, the step and the checkpoints; the rest has its own module: the cheap checks before
start-up (rpo.train.preflight), rank agreement on errors (rpo.train.ranks), the divergence guard
(rpo.train.guard), preemption and launcher death (rpo.train.signals), micro-batches and the eval split
(rpo.data), the reference log-probs (rpo.train.reference_logps) and what a run shows and writes
(rpo.train.reporting, a Callback). Exit codes and failure lines: rpo.train.exits.

One optimiser step, per data-parallel rank r of W:
  1. this rank's slice of the global batch (rpo.data.PreferenceBatcher) is cut into A micro-batches
     (A = global / (micro x W), rpo.data.micro_batches); each micro-batch is one concatenated forward of its
     chosen and rejected rows;
  2. per-sequence log-probs (rpo.models.logprobs) of the policy, and of the frozen reference
     (rpo.train.reference_logps: a second model with the same sharding, or `--precompute-reference`'s cache);
  3. the loss (rpo.losses, built by rpo.train.config.build_training_loss) and its backward, the data-parallel
     objective of rpo.distributed (`data_parallel_objective`: after Megatron DDP's gradient averaging the gradient
     is that of the loss of the whole global batch); when a global loss's batch spans several micro-batches,
     rpo.distributed.TwoPassContrast (scores of every micro-batch, the global matrix, then each micro-batch's
     backward from its score gradients: through its kept graph, or a second forward for those the memory plan
     does not keep);
  4. DDP gradient all-reduce, global-norm clipping, the guard's verdict (one small all-reduce: non-finite numbers
     on any rank, a stop signal), optimiser update (or a skipped one), learning-rate schedule.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from rpo.progress import StageProgress
from rpo.train import checkpoint as ckpt
from rpo.train import preflight, ranks, scale, signals
from rpo.train.callbacks import Callback
from rpo.models.packing import sequence_logps
from rpo.train.config import ConfigError, TrainConfig, build_training_loss, default_dataset_path
from rpo.train.exits import Diverged, Interrupted, describe_failure, signal_name
from rpo.train.guard import DivergenceGuard, StepVerdict
from rpo.train.metrics import WeightedMean, all_reduce_sum
from rpo.train.reference_logps import ReferenceLogps, model_fingerprint, precompute_reference_logps
from rpo.train.reporting import RunReport, loss_summary

logger = logging.getLogger("rpo.train")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

Batch = Dict[str, Any]


class Trainer:
    """Preference training of a Megatron-core GPTModel (see the module docstring for one step).

    `fit()` is collective (every rank of the launch calls it) and returns the run summary on every rank.
    `callbacks` run after the trainer's own run report (metrics.jsonl, progress, summary, curves).
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = ()):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer needs a TrainConfig, got {type(config).__name__}")
        self.config = config.validate()
        scale.check_scale_options(self.config)
        if self.config.plan:
            raise ConfigError("--plan prints the memory estimate without training: run rpo-train --plan (or "
                              "rpo.train.scale.print_memory_plan), not a Trainer")
        self.report = RunReport(Path(config.output_dir), progress_bar=config.progress_bar,
                                report_to=config.report_to)
        self.callbacks = [self.report, *callbacks]

    # ================================================================================================ set-up ==
    def setup(self) -> None:
        """Checks, parallel state, data, models, loss, optimiser, resume. Called by fit(); separate for tests."""
        from rpo.models.parallel import init_parallel

        cfg = self.config
        signals.exit_with_launcher()  # a rank of a multi-process launch stops when its launcher dies
        preflight.check_before_start(cfg)  # cheap checks before any heavy start-up
        self.loss = build_training_loss(cfg)  # built again for unpaired data once the data is read
        megatron_logger = logging.getLogger("megatron.core")
        if megatron_logger.level == logging.NOTSET:
            megatron_logger.setLevel(logging.WARNING)  # its INFO lines list every parameter of every bucket
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
        self.cuda = torch.cuda.is_available()
        self.parallel = init_parallel(cfg.tensor_parallel, seed=cfg.seed, expert_parallel=cfg.expert_parallel)
        ranks.start_failure_watch()  # from here on, a failure on one rank ends every rank with one line
        from megatron.core import parallel_state

        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size, self.dp_rank = self.parallel.dp_size, self.parallel.dp_rank
        self.rank = self.parallel.rank
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.dtype = self._resolve_dtype()
        self.guard = DivergenceGuard(cfg.max_skipped_steps)
        self.accumulation = cfg.batch_layout(self.dp_size)
        self.rank_batch_size = cfg.global_batch_size // self.dp_size

        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else preflight.default_cache_root()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_checkpoints(self.checkpoint_dir)
        ranks.barrier()

        with ranks.main_first():  # rank 0 converts / downloads, the others then find the folder
            self.model_path = (preflight.resolve_model_path(cfg.model, "--model") if cfg.model
                               else preflight.default_model_path(progress=cfg.progress_bar and self.is_main))
            self.reference_path = (preflight.resolve_model_path(cfg.reference_model, "--reference-model")
                                   if cfg.reference_model else self.model_path)
        self.dataset_path = cfg.dataset or str(default_dataset_path())
        self.two_pass = self.loss.is_global and self.accumulation > 1

        self._setup_data()
        self._setup_models()
        self.kept_graphs, self.last_kept = 0, ()  # the global contrast's kept graphs (see _two_pass_step)
        if self.two_pass and self._router_loss_active():
            # The load-balancing loss's gradient uses the latest forward's routing (rpo.models.moe): every
            # micro-batch is re-run, so its backward follows its own forward.
            if self.is_main:
                logger.info("global contrast over %d micro-batches per rank: a mixture-of-experts model keeps no graph "
                            "(each micro-batch re-run; --keep-graphs does not apply)", self.accumulation)
        elif self.two_pass:
            self.kept_graphs = scale.kept_graphs(cfg, self.hf_config, world_size=self.parallel.world_size,
                                                 micro_batches=self.accumulation,
                                                 needs_reference=self.loss.needs_reference, device=self.device)
            if self.is_main:
                logger.info("global contrast over %d micro-batches per rank: the graphs of %d kept (one forward "
                            "each), %d re-run (a second forward each; --keep-graphs)", self.accumulation,
                            self.kept_graphs, self.accumulation - self.kept_graphs)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.batcher)))
        from rpo.train.optim import TrainOptimizer

        self.optimizer = TrainOptimizer(cfg, self.ddp_model, bf16=self.dtype == torch.bfloat16,
                                        total_steps=self.total_steps)
        self.step = 0
        self.log_accumulator = WeightedMean()
        self.history: List[Dict[str, Any]] = []
        self.last_step_metrics: Dict[str, float] = {}
        self._prune_pending = False  # old checkpoints go once the step after a save proved the new one good
        self._signals: Optional[signals.StopSignals] = None
        self.last_verdict = StepVerdict(None, 0)
        if cfg.resume:
            self._resume(cfg.resume)
        # Written once set-up succeeded: a run stopped by a data or option error leaves nothing that would make
        # its corrected rerun look like a previous run.
        with ranks.together():
            if self.is_main:
                resolved = replace(cfg, model=str(self.model_path), dataset=str(self.dataset_path),
                                   cache_dir=str(self.cache_root))
                resolved.to_yaml(self.output_dir / "config.yaml")
                (self.output_dir / preflight.LOSS_FILE).write_text(
                    json.dumps({**self.loss.describe(), "paired": self.paired}, indent=2) + "\n")
        ranks.barrier()

    def _resolve_dtype(self) -> torch.dtype:
        choice = self.config.dtype
        if choice == "auto":
            return torch.bfloat16 if self.cuda else torch.float32
        if choice == "bfloat16" and not self.cuda:
            logger.warning("--dtype bfloat16 on CPU: slow and inexact; float32 is the CPU default")
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]

    # --------------------------------------------------------------------------------------------- data ----
    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.config
        with ranks.together():
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or self.model_path,
                                                           trust_remote_code=cfg.trust_remote_code)
        # Rank 0 first: it fills the embedding cache, the other ranks then only read it.
        with ranks.main_first():
            train_all = self._tokenize(self.dataset_path, cfg.dataset_split)
            eval_set = None
            if cfg.eval_dataset:
                if cfg.eval_split_fraction and self.is_main:
                    logger.info("--eval-dataset given: --eval-split-fraction %s is not used",
                                cfg.eval_split_fraction)
                train_set = train_all
                eval_set = self._tokenize(cfg.eval_dataset, cfg.eval_dataset_split)
            elif cfg.eval_split_fraction > 0:
                train_set, eval_set = self._split(train_all, cfg.eval_split_fraction)
            else:
                train_set = train_all
            tokenized, embeddings, _ = train_set
            if len(tokenized) < cfg.global_batch_size:
                raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is larger than the {len(tokenized)} "
                                  f"training rows of {self.dataset_path}")
            if eval_set is not None and len(eval_set[0]) < self.dp_size:
                raise ConfigError(f"the evaluation data has {len(eval_set[0])} rows, fewer than the {self.dp_size} "
                                  f"data-parallel ranks; raise --eval-split-fraction or pass --eval-dataset")
        self.train_data, self.eval_data = train_set, eval_set
        # Every rank together: an error here on one rank only (a loss that refuses this data, a batch layout the
        # data cannot fill) must not leave the others waiting in the next collective.
        with ranks.together():
            self._setup_batchers(tokenized, embeddings, eval_set)

    def _setup_batchers(self, tokenized, embeddings, eval_set) -> None:
        from rpo.data import PreferenceBatcher

        cfg = self.config
        if not tokenized.paired:
            self.loss = build_training_loss(cfg, paired=False)
        self.paired = tokenized.paired
        if self.is_main:
            logger.info("%s", loss_summary(self.loss))
        try:
            self.batcher = PreferenceBatcher(tokenized, embeddings, self.rank_batch_size, self.dp_rank,
                                             self.dp_size, cfg.seed, batching=cfg.batching,
                                             related_fraction=cfg.related_fraction)
        except ValueError as error:  # e.g. a --related-fraction that leaves no related group
            raise ConfigError(f"--batching {cfg.batching} --related-fraction {cfg.related_fraction}: {error}") from None
        self.eval_batcher = None
        if eval_set is not None:
            per_rank = min(cfg.eval_batch_size or cfg.micro_batch_size, len(eval_set[0]) // self.dp_size)
            self.eval_batcher = PreferenceBatcher(eval_set[0], eval_set[1], per_rank, self.dp_rank, self.dp_size,
                                                  cfg.seed)
        if self.is_main:
            logger.info("data: %d training %s, %s evaluation rows; %d steps of %d per epoch", len(tokenized),
                        "pairs" if tokenized.paired else "examples",
                        len(eval_set[0]) if eval_set else "no", len(self.batcher), cfg.global_batch_size)

    def _tokenize(self, source: str, split: str):
        """(tokenized dataset, prompt embeddings or None, source name) of one data source."""
        from rpo.data import compute_prompt_embeddings, load_preference_dataset, tokenize_preference_dataset

        cfg = self.config
        bar = cfg.progress_bar and self.is_main  # without a bar: log lines at least every 30 s
        try:
            dataset = load_preference_dataset(source, split=split, columns=cfg.columns,
                                              skip_bad_rows=cfg.skip_bad_rows)
        except ValueError as error:
            if isinstance(error, ranks.user_error_types()):
                raise
            raise ConfigError(str(error)) from None  # the loader's messages name the file (and line)
        tokenized = tokenize_preference_dataset(dataset, self.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                                max_length=cfg.max_length, progress=bar)
        embeddings = None
        if self.loss.needs_embeddings or cfg.batching == "related":
            kwargs = {"model": cfg.embedding_model} if cfg.embedding_model else {}
            embeddings = compute_prompt_embeddings(list(tokenized.rows["prompt"]),
                                                   cache_dir=self.cache_root / "prompt_embeddings", progress=bar,
                                                   **kwargs)
        return tokenized, embeddings, str(source)

    def _split(self, data, fraction: float):
        """Seeded held-out split (rpo.data.held_out_rows) of (tokenized, embeddings, source) into train and eval."""
        from rpo.data import held_out_rows, select_rows

        tokenized, embeddings, source = data
        try:
            parts = held_out_rows(len(tokenized), fraction, self.config.seed)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return tuple((select_rows(tokenized, rows), None if embeddings is None else embeddings[torch.as_tensor(rows)],
                      f"{source}[{name} split]") for rows, name in zip(parts, ("train", "eval")))

    # ------------------------------------------------------------------------------------------- models ----
    def _setup_models(self) -> None:
        from rpo.models import load_policy, reference_model

        cfg = self.config
        with ranks.together():
            policy, self.hf_config, _ = load_policy(self.model_path, cfg.tensor_parallel, self.dtype,
                                                    trust_remote_code=cfg.trust_remote_code, recompute=cfg.recompute,
                                                    sequence_parallel=cfg.sequence_parallel,
                                                    moe_aux_loss_coeff=cfg.moe_aux_loss_coeff)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=cfg.distributed_optimizer)
        self.policy = policy
        self.ddp_model = DistributedDataParallel(config=policy.config, ddp_config=ddp_config, module=policy)
        self.reference_logps: Optional[ReferenceLogps] = None
        if not self.loss.needs_reference:
            return
        if cfg.precompute_reference:
            # Without --reference-model the reference is the policy's starting weights: score with the policy
            # itself (this runs before training and before --resume loads checkpointed weights).
            splits = {name: (data[0], data[2]) for name, data in (("train", self.train_data),
                                                                   ("eval", self.eval_data)) if data is not None}
            fingerprint = [model_fingerprint(self.reference_path), str(self.dtype), cfg.max_length,
                           cfg.max_prompt_length]
            self.reference_logps = precompute_reference_logps(
                splits, load_model=self._load_reference if cfg.reference_model else lambda: self.policy,
                fingerprint=fingerprint, batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
                cache_root=self.cache_root, dp_group=self.dp_group, device=self.device,
                progress_bar=cfg.progress_bar)
        else:
            # --reference-model, or the policy's starting weights (taken before --resume loads checkpointed ones).
            model = self._load_reference() if cfg.reference_model else reference_model(policy)
            self.reference_logps = ReferenceLogps(model=model, device=self.device)

    def _load_reference(self):
        """The --reference-model folder's weights (no tokenizer needed: it scores the policy's token ids)."""
        from rpo.models import load_gpt_model

        with ranks.together():
            reference, reference_config = load_gpt_model(self.reference_path, self.config.tensor_parallel,
                                                         self.dtype, trust_remote_code=self.config.trust_remote_code,
                                                         sequence_parallel=self.config.sequence_parallel)
        if reference_config.vocab_size != self.hf_config.vocab_size:
            raise ConfigError(f"--reference-model {self.config.reference_model}: its vocabulary has "
                              f"{reference_config.vocab_size} tokens, the policy's ({self.model_path}) "
                              f"{self.hf_config.vocab_size}; the reference must score the policy's token ids")
        reference.requires_grad_(False)
        reference.eval()
        return reference

    @property
    def reference(self):
        """The live reference model (None with --precompute-reference or a loss without reference)."""
        return None if self.reference_logps is None else self.reference_logps.model

    # ========================================================================================= forward ==
    def _reference(self, batch: Batch, split: str) -> Optional[torch.Tensor]:
        if self.reference_logps is None:
            return None
        return self.reference_logps(batch, split, packing=self._pack_plan(batch))

    def _pack_plan(self, batch: Batch):
        """--packing: the PackPlan of the batch's rows (rpo.models.plan_packing), else None. Made once per batch
        and kept in it: the policy, the reference and both passes of the two-pass contrast pack alike."""
        length = scale.pack_length(self.config)
        if length is None:
            return None
        if "pack_plan" not in batch:
            from rpo.models.packing import plan_packing

            batch["pack_plan"] = plan_packing(batch["attention_mask"], length)
        return batch["pack_plan"]

    def _packed_slots(self, micro: List[Batch]) -> tuple:
        """(token slots of the packed forwards, of the unpacked ones) of this rank's micro-batches (0, 0 without
        --packing), for packing/padding_removed."""
        plans = [self._pack_plan(mb) for mb in micro]
        if plans and plans[0] is None:
            return 0, 0
        return (sum(plan.packed_rows * plan.packed_length for plan in plans),
                sum(plan.unpacked_shape[0] * plan.unpacked_shape[1] for plan in plans))

    def _loss_inputs(self, batch: Batch, policy: torch.Tensor, counts: torch.Tensor,
                     reference: Optional[torch.Tensor]) -> Dict[str, Any]:
        m = batch["num_chosen"]
        policy, reference = self.guard.screen(policy), self.guard.screen(reference)  # a diverged model's NaN -> 0
        inputs = {
            "policy_chosen_logps": policy[:m], "policy_rejected_logps": policy[m:],
            "chosen_lengths": counts[:m], "rejected_lengths": counts[m:],
        }
        if reference is not None:
            inputs["reference_chosen_logps"] = reference[:m]
            inputs["reference_rejected_logps"] = reference[m:]
        if self.loss.needs_embeddings:
            inputs["chosen_embeddings"] = batch["chosen_embeddings"].to(self.device)
            inputs["rejected_embeddings"] = batch["rejected_embeddings"].to(self.device)
        if self.loss.is_global:
            inputs["process_group"] = self.dp_group
        return inputs

    @torch.no_grad()
    def _kl_inputs(self, batch: Batch, batcher) -> Dict[str, Any]:
        """KTO's mismatched pairs of this rank's rows (rpo.data.kto_pairs), paired over the global batch
        (`batcher` made `batch`), scored by the policy and the live reference without gradients (z is detached),
        in micro-batches; {} for a loss without KL.

        Paired over the global batch, so the pairs and z do not depend on how the step is cut into ranks and
        micro-batches. The loss all-reduces z over the data-parallel group. Cost: one more forward of the batch's
        rows through the policy and one through the reference per step.
        """
        if not self.loss.uses_kl_pairs:
            return {}
        from rpo.data import micro_batches
        from rpo.data.kto_pairs import mismatched_pairs

        pairs = mismatched_pairs(batch, max_length=self.config.max_length, pad_token_id=self.train_data[0].pad_token_id,
                                 global_batch=batcher.global_completions(batch))
        count = pairs["num_chosen"]
        policy, reference = [], []
        for mb in (micro_batches(pairs, min(self.accumulation, count)) if count else []):
            policy.append(sequence_logps(self.ddp_model, mb, grad=False)[0])
            reference.append(sequence_logps(self.reference, mb, grad=False)[0])
        empty = torch.zeros(0, device=self.device)
        return {"kl_policy_logps": torch.cat(policy) if policy else empty,
                "kl_reference_logps": torch.cat(reference) if reference else empty,
                "process_group": self.dp_group}

    def _objective(self, output, rows: int, rows_global: int) -> torch.Tensor:
        """What to back-propagate so that DDP's averaged gradient is the gradient of the global batch's loss
        (rpo.distributed.data_parallel_objective; `rows` of the step's `rows_global` chosen + rejected rows)."""
        from rpo.distributed import data_parallel_loss_scale, data_parallel_objective

        return data_parallel_objective(output.loss, output.global_loss, rows=rows, rows_global=rows_global,
                                       world=data_parallel_loss_scale(self.dp_group))

    def _router_loss_active(self) -> bool:
        from rpo.models import moe

        balance = moe.load_balancing(self.ddp_model)
        return balance is not None and balance.active

    def _router_loss_weight(self):
        """A mixture-of-experts policy's load-balancing loss (rpo.models.moe: transformers' over the micro-batch of
        every DP rank) in the backward of the next micro-batch, weighted W / A so that after DDP's averaging the
        step's gradient is that of the mean over its A micro-batches; returns what to log after the forward
        (`.metrics()`, {} for a dense policy)."""
        from rpo.distributed import data_parallel_loss_scale
        from rpo.models import moe

        return moe.weight_router_loss(self.ddp_model, data_parallel_loss_scale(self.dp_group) / self.accumulation)

    # ============================================================================================ step ===
    def train_step(self, batch: Batch) -> Dict[str, Any]:
        """One optimiser step on this rank's slice of the global batch; returns the step's reduced metrics."""
        from rpo.data import micro_batches
        from rpo.data.related import mean_offdiagonal_cosine, offdiagonal_cosine_sums

        started = time.perf_counter()
        self.ddp_model.train()
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.lr
        micro = micro_batches(batch, self.accumulation)
        rows = batch["num_chosen"] + batch["num_rejected"]
        chosen_tokens = int(batch["loss_mask"][:batch["num_chosen"]].sum())
        # What --batching did: the global batch's off-diagonal prompt cosine, from per-rank sums (same collective).
        cosine_sums = ([] if batch["chosen_embeddings"] is None else offdiagonal_cosine_sums(
            batch["chosen_embeddings"], batch["rejected_embeddings"], batch["paired"]).tolist())
        rows_global, tokens, chosen_tokens_global, packed_slots, unpacked_slots, *cosine_sums = all_reduce_sum(
            [rows, int(batch["attention_mask"].sum()), chosen_tokens, *self._packed_slots(micro), *cosine_sums],
            self.dp_group)
        metrics = WeightedMean()
        step_inputs = self._kl_inputs(batch, self.batcher)  # loss keywords of the step, the same for each micro-batch
        if "chosen_tokens_per_row" in self.loss.requires | self.loss.optional:  # a token mean (sft): the step's
            step_inputs["chosen_tokens_per_row"] = chosen_tokens_global / rows_global
        if self.two_pass:
            self._two_pass_step(micro, rows, rows_global, metrics, step_inputs)
        else:
            for mb in micro:
                router_loss = self._router_loss_weight()
                policy, counts = sequence_logps(self.ddp_model, mb, grad=True, packing=self._pack_plan(mb))
                inputs = {**self._loss_inputs(mb, policy, counts, self._reference(mb, "train")), **step_inputs}
                output = self.loss(**inputs)
                mb_rows = mb["num_chosen"] + mb["num_rejected"]
                self._objective(output, mb_rows, rows_global).backward()
                metrics.add({"loss": output.loss, **output.metrics, **router_loss.metrics()}, weight=mb_rows)
        # megatron's own gradient finalisation: DDP's data-parallel reduction (finish_grad_sync), and with
        # --sequence-parallel the sum over the TP group of the norm weights' gradients (each TP rank saw T/TP
        # positions).
        finalize_model_grads([self.ddp_model])
        reduced = metrics.reduce(self.dp_group)
        grad_norm = self.optimizer.prepare()
        self.last_verdict = self.guard.judge(reduced.get("loss"), grad_norm,  # collective (rpo.train.guard)
                                             self._signals.pending() if self._signals else 0)
        self.optimizer.finish(update=self.last_verdict.update)
        step_time = time.perf_counter() - started
        reduced.update(lr=lr, grad_norm=grad_norm, step_time=step_time, tokens_per_s=tokens / step_time)
        if unpacked_slots:
            reduced["packing/padding_removed"] = 1.0 - packed_slots / unpacked_slots
        if cosine_sums:
            reduced["batch/offdiag_prompt_cosine"] = mean_offdiagonal_cosine(torch.tensor(cosine_sums), batch["paired"])
        return reduced

    def _two_pass_step(self, micro: List[Batch], rows: int, rows_global: int, metrics: WeightedMean,
                       step_inputs: Dict[str, Any]) -> None:
        from megatron.core import tensor_parallel

        from rpo.distributed import TwoPassContrast

        references = [self._reference(mb, "train") for mb in micro]
        counts: List[torch.Tensor] = []  # token counts do not depend on the weights: kept from pass 1
        chosen = lambda values, mb: values[:mb["num_chosen"]]  # noqa: E731
        rejected = lambda values, mb: values[mb["num_chosen"]:]  # noqa: E731
        whole = {
            "num_chosen": sum(mb["num_chosen"] for mb in micro),
            "chosen_embeddings": _cat([mb["chosen_embeddings"] for mb in micro]),
            "rejected_embeddings": _cat([mb["rejected_embeddings"] for mb in micro]),
        }
        outputs = []

        def scores(mb):
            grad = torch.is_grad_enabled()
            router_loss = self._router_loss_weight()
            policy, mb_counts = sequence_logps(self.ddp_model, mb, grad=grad, packing=self._pack_plan(mb))
            if grad:  # pass 2: its backward carries the router loss
                metrics.add(router_loss.metrics(), weight=mb["num_chosen"] + mb["num_rejected"])
            if len(counts) < len(micro):
                counts.append(mb_counts)
            return chosen(policy, mb), rejected(policy, mb)

        def step_loss(chosen_scores, rejected_scores):
            m = whole["num_chosen"]
            ordered = lambda parts: torch.cat([chosen(p, mb) for p, mb in zip(parts, micro)]  # noqa: E731
                                              + [rejected(p, mb) for p, mb in zip(parts, micro)])
            policy = torch.cat([chosen_scores, rejected_scores])
            reference = ordered(references) if references[0] is not None else None
            inputs = {**self._loss_inputs(whole, policy, ordered(counts), reference), **step_inputs}
            assert inputs["policy_chosen_logps"].shape[0] == m
            output = self.loss(**inputs)
            outputs.append(output)
            return self._objective(output, rows, rows_global)

        # Attention dropout draws from megatron's model-parallel RNG tracker: replayed in pass 2 too. The first
        # kept_graphs micro-batches keep their pass-1 graph (no second forward), as the memory plan allows.
        result = TwoPassContrast(scores, step_loss, rng_state_trackers=[tensor_parallel.get_cuda_rng_tracker()],
                                 keep_graphs=self.kept_graphs).step(micro)
        self.last_kept = result.kept
        output = outputs[-1]
        metrics.add({"loss": output.loss, **output.metrics}, weight=rows)

    # ============================================================================================ eval ===
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """The loss's metrics on the held-out data, averaged over all of it (every DP rank's share)."""
        if self.eval_batcher is None:
            return {}
        self.ddp_model.eval()
        metrics = WeightedMean()
        with StageProgress("evaluation", len(self.eval_batcher), unit="batches", logger=logger,
                           progress=self.config.progress_bar and self.is_main) as progress:
            for index in range(len(self.eval_batcher)):
                batch = self.eval_batcher.batch(0, index)
                policy, counts = sequence_logps(self.ddp_model, batch, grad=False, packing=self._pack_plan(batch))
                inputs = {**self._loss_inputs(batch, policy, counts, self._reference(batch, "eval")),
                          **self._kl_inputs(batch, self.eval_batcher)}
                output = self.loss(**inputs)
                metrics.add({"loss": output.loss, **output.metrics},
                            weight=batch["num_chosen"] + batch["num_rejected"])
                progress.update(1)
        self.ddp_model.train()
        return {f"eval/{key}": value for key, value in metrics.reduce(self.dp_group).items()}

    # ============================================================================================= fit ===
    def fit(self) -> Dict[str, Any]:
        """Train to --max-steps (or --epochs), evaluate, checkpoint, save final/; returns the run summary.

        Stops early with `Diverged` (the divergence guard) or `Interrupted` (SIGTERM / SIGINT; a checkpoint of the
        last step saved unless --no-save-on-signal); any failure is shared with every rank (rpo.train.ranks)."""
        stop_signals = signals.StopSignals().install()  # set-up: a signal stops at once
        try:
            if not hasattr(self, "batcher"):
                self.setup()
            return self._fit(stop_signals)
        except BaseException as error:
            code, line, _ = describe_failure(error, getattr(self, "rank", 0))
            ranks.share_failure(code, line)  # the other ranks end with it, even if blocked in a collective
            raise
        finally:
            stop_signals.restore()
            self._signals = None
            ranks.stop_failure_watch()

    def _fit(self, stop_signals: signals.StopSignals) -> Dict[str, Any]:
        cfg = self.config
        started = time.perf_counter()
        start_step = self.step
        tokens_seen = 0.0
        eval_metrics: Dict[str, float] = {}
        batches = self._batches()
        self._signals = stop_signals
        self._notify("on_fit_start")
        try:
            with stop_signals.deferred():
                while self.step < self.total_steps:
                    batch = next(batches)
                    step_metrics = self.train_step(batch)
                    self.step += 1
                    verdict = self.last_verdict
                    diverged = self.guard.record(self.step, verdict)
                    last = self.step == self.total_steps
                    if last and not verdict.update:
                        diverged = True  # a run does not end on an update it could not apply
                    tokens_seen += step_metrics["tokens_per_s"] * step_metrics["step_time"]
                    timing = {k: step_metrics.pop(k) for k in ("lr", "grad_norm", "step_time", "tokens_per_s")}
                    if verdict.nonfinite_logps:
                        # The loss saw zeros in place of the non-finite values: its numbers mean nothing (the
                        # batch's own properties, batch/* and packing/*, still hold).
                        step_metrics = {key: value if key.startswith(("batch/", "packing/")) else float("nan")
                                        for key, value in step_metrics.items()}
                        self.log_accumulator.poison(key for key, value in step_metrics.items() if value != value)
                        self.log_accumulator.add({k: v for k, v in step_metrics.items() if v == v})
                    else:
                        self.log_accumulator.add(step_metrics)
                    self.last_step_metrics = {**step_metrics, **timing}
                    if verdict.update and self._prune_pending:
                        self._prune_checkpoints()
                    record = None
                    evaluate = self.eval_batcher is not None and not self.guard.in_bad_state and (
                        last or (cfg.eval_every and self.step % cfg.eval_every == 0))
                    eval_problem = None
                    if evaluate:
                        eval_metrics, eval_problem = self._evaluate_checked()
                    if self.step % cfg.log_every == 0 or last or evaluate or not verdict.update:
                        record = {"step": self.step, "epoch": self._epoch_position(),
                                  **self.log_accumulator.reduce(), **timing, **(eval_metrics if evaluate else {})}
                        self.log_accumulator = WeightedMean()
                        self.history.append(record)
                        self._notify("on_log", record)
                    if eval_problem:
                        self._stop_diverged(eval_problem, first_bad_step=self.step + 1)
                    if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                        if self.guard.in_bad_state:
                            if self.is_main:
                                logger.warning("step %d: no checkpoint: the step's update was skipped", self.step)
                        else:
                            self.save_checkpoint()
                    self._notify("on_step_end", self.step, record)
                    if diverged:
                        self._stop_diverged(verdict.problem)
                    if verdict.signal:
                        self._stop_for_signal(verdict.signal, stop_signals)
        finally:
            self._notify("on_loop_end")
        elapsed = time.perf_counter() - started
        final_dir = None
        with stop_signals.saving():  # the run is done: a signal now waits for its outputs
            if cfg.save_every and self.step % cfg.save_every == 0 and self._saved_step != self.step:
                self.save_checkpoint()
            if self._prune_pending:
                self._prune_checkpoints()
            if cfg.save_final:
                from rpo.models.hf_checkpoint import save_hf

                if not self._weights_finite():
                    self._stop_diverged("a weight is not finite", first_bad_step=self.step + 1)
                final_dir = self.output_dir / "final"
                with _logged_stage(f"final model {final_dir}", self.is_main):
                    save_hf(self.ddp_model, self.hf_config, final_dir, tokenizer_src=self.tokenizer)
        summary = {
            "steps": self.step, "steps_this_run": self.step - start_step, "time_s": elapsed,
            "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else float("nan"),
            "final_train_metrics": self.history[-1] if self.history else {},
            "final_eval_metrics": eval_metrics, "skipped_updates": self.optimizer.skipped_updates,
            "output_dir": str(self.output_dir), "metrics": str(self.report.metrics_log.path),
            "curves": str(self.output_dir / "curves.png"),
            "checkpoints": str(self.checkpoint_dir) if ckpt.latest_checkpoint(self.checkpoint_dir) else None,
            "tensorboard": (str(self.output_dir / "tensorboard") if cfg.report_to == "tensorboard" else None),
            "final_model": str(final_dir) if final_dir else None,
        }
        self._notify("on_fit_end", summary)
        ranks.stop_failure_watch()  # before the last barrier: no rank polls the store after rank 0 has left
        ranks.barrier()
        return summary

    def _evaluate_checked(self) -> tuple:
        """(eval metrics, a problem or None): the evaluation, and whether every rank saw finite numbers in it."""
        eval_metrics = self.evaluate()
        nonfinite, _ = self.guard.agree()  # collective
        if nonfinite:
            return {key: float("nan") for key in eval_metrics}, "a log-prob of the evaluation data is not finite"
        loss = eval_metrics.get("eval/loss", 0.0)
        if not math.isfinite(loss):
            return eval_metrics, f"the evaluation loss is {loss}"
        return eval_metrics, None

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        """Collective: every parameter of every rank is finite (checked before final/ is exported)."""
        bad = sum(int(not torch.isfinite(param).all()) for param in self.policy.parameters())
        group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        return all_reduce_sum([bad], group)[0] == 0

    def _stop_diverged(self, problem: str, first_bad_step: Optional[int] = None) -> None:
        """Collective: set aside the checkpoint whose weights gave the first bad numbers, raise Diverged (exit 3).

        `first_bad_step`: for a problem found outside the step's verdict (the evaluation, the final weights), the
        step whose weights showed it is `first_bad_step - 1`."""
        first_bad = first_bad_step or self.guard.first_bad_step or self.step
        suspect = self.checkpoint_dir / f"step-{first_bad - 1:08d}"
        if self.is_main and suspect.is_dir():
            marked = ckpt.mark_diverged(suspect)
            logger.warning("set aside %s: its weights gave the non-finite numbers", marked)
        ranks.barrier()
        good = ckpt.latest_checkpoint(self.checkpoint_dir)
        what = (f"the run diverged at step {self.step}: {problem}" if first_bad_step else
                self.guard.describe(self.step, problem, last_step=self.step == self.total_steps))
        advice = (f"the last good checkpoint is {good}: continue from it with a lower --lr (--resume --lr ... "
                  f"--allow-schedule-change)" if good else
                  "no checkpoint was written before it: start again with a lower --lr (--overwrite)")
        raise Diverged(f"{what}; no final/ written; {advice}")

    def _stop_for_signal(self, signum: int, stop_signals: signals.StopSignals) -> None:
        """Collective: every rank agreed to stop after this step: save it (unless told not to), raise Interrupted."""
        name = signal_name(signum)
        saved = None
        if not self.config.save_on_signal:
            what = "nothing saved (--no-save-on-signal)"
        elif self.guard.in_bad_state:
            what = "nothing saved: the step's update was skipped by the divergence guard"
        else:
            with stop_signals.saving():
                saved = (self.checkpoint_dir / f"step-{self.step:08d}" if self._saved_step == self.step
                         else self.save_checkpoint())
            what = f"saved {saved}; continue with --resume"
        raise Interrupted(signum, f"stopped by {name} after step {self.step} of {self.total_steps}: {what}")

    def _prune_checkpoints(self) -> None:
        self._prune_pending = False
        if self.is_main:
            for path in ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints):
                logger.info("removed old checkpoint %s (--keep-checkpoints %d)", path.name,
                            self.config.keep_checkpoints)

    def _notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)  # duck-typed callbacks may define only some hooks
            if method is not None:
                method(self, *args)

    def _batches(self) -> Iterator[Batch]:
        while True:
            yield from self.batcher

    def _epoch_position(self) -> float:
        state = self.batcher.state_dict()
        return state["epoch"] + state["batch_in_epoch"] / len(self.batcher)

    # ===================================================================================== checkpoints ===
    _saved_step: Optional[int] = None

    def save_checkpoint(self) -> Path:
        """Collective: model, optimiser, scheduler, RNG, data position and log state of this step. Old checkpoints
        beyond --keep-checkpoints are removed after the next step proved this one good (see `_fit`)."""
        unique_copy = self.dp_rank == 0  # DP replicas hold identical weights and optimiser state
        shard = self.dp_rank if self.config.distributed_optimizer else None  # ... unless it is sharded over them
        model_state = {name: p for name, p in self.policy.named_parameters()} if unique_copy else None
        rank_state = {"rng": ckpt.rng_state(), "batcher": self.batcher.state_dict(),
                      "log_accumulator": {"sums": self.log_accumulator.sums,
                                          "weights": self.log_accumulator.weights}}
        trainer_state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.parallel.world_size,
                         "tensor_parallel": self.parallel.tp_size, "config": self.config.to_dict()}
        with _logged_stage(f"checkpoint of step {self.step}", self.is_main):
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, trainer_state=trainer_state,
                                        model_state=model_state,
                                        optimizer_state=(self.optimizer.state_dict()
                                                         if unique_copy or shard is not None else None),
                                        dp_rank=shard, rank_state=rank_state, tp_rank=self.parallel.tp_rank)
        self._saved_step = self.step
        self._prune_pending = True
        return path

    def _resume(self, where: str) -> None:
        """Collective: load the checkpoint `where` (a folder, or 'latest': the newest intact one, falling back past
        damaged ones with a log line each), check that this run continues it, and restore every state."""
        explicit = where != "latest"
        candidates = [Path(where)] if explicit else list(reversed(ckpt.list_checkpoints(self.checkpoint_dir)))
        if not candidates:
            if self.is_main:
                aside = sorted(p.name for p in self.checkpoint_dir.glob("diverged-step-*"))
                logger.info("--resume: no checkpoint in %s yet%s; starting from step 0", self.checkpoint_dir,
                            f" ({', '.join(aside)} set aside by the divergence guard)" if aside else "")
            return
        shard = self.dp_rank if self.config.distributed_optimizer else None
        damaged: List[str] = []
        loaded = None
        for index, path in enumerate(candidates):
            problem, error = None, None
            try:
                self._check_topology(path, ckpt.load_trainer_state(path))
                loaded = ckpt.load_checkpoint(path, rank=self.rank, tp_rank=self.parallel.tp_rank,
                                              optimizer_shard=shard)
            except ckpt.CheckpointDamaged as caught:
                problem = str(caught)
            except Exception as caught:  # noqa: BLE001 - not a checkpoint, another launch size: shared below
                error = caught
            with ranks.together():  # the same error on every rank (the lowest failing rank's)
                if error is not None:
                    raise error
            problems = [p for p in _all_gather(problem) if p is not None]
            if not problems:
                break
            loaded = None
            damaged.append(problems[0])
            if explicit:
                raise ConfigError(f"--resume {path}: damaged checkpoint: {problems[0]}; pass another checkpoint, or "
                                  f"--resume latest for the newest intact one")
            if self.is_main:
                following = candidates[index + 1].name if index + 1 < len(candidates) else "none left"
                logger.warning("--resume: checkpoint %s; falling back to the previous one (%s)", problems[0],
                               following)
        if loaded is None:
            raise ConfigError(f"--resume: no intact checkpoint in {self.checkpoint_dir} ({'; '.join(damaged)}); "
                              f"start again with --overwrite")
        with ranks.together():
            self._restore(path, loaded)
        if self.is_main:
            note = f" (the newest intact one; {len(damaged)} damaged checkpoint(s) skipped)" if damaged else ""
            logger.info("resumed from %s at step %d%s", path, self.step, note)

    def _check_topology(self, path: Path, state: Dict[str, Any]) -> None:
        if (state["world_size"], state["tensor_parallel"]) != (self.parallel.world_size, self.parallel.tp_size):
            raise ConfigError(f"--resume {path}: written by {state['world_size']} processes with tensor-parallel "
                              f"{state['tensor_parallel']}; this launch has {self.parallel.world_size} and "
                              f"{self.parallel.tp_size}")

    def _restore(self, path: Path, loaded: Dict[str, Any]) -> None:
        """Check that this run continues the checkpointed one, then restore weights, optimiser, data, RNG, logs."""
        from rpo.train.optim import schedule_change

        state = loaded["trainer"]
        saved = dict(state["config"])
        for key in ("global_batch_size", "micro_batch_size", "seed", "loss", "optimizer", "distributed_optimizer"):
            if saved.get(key) != getattr(self.config, key):
                raise ConfigError(f"--resume {path}: --{key.replace('_', '-')} was {saved.get(key)!r} in the "
                                  f"checkpointed run, now {getattr(self.config, key)!r}; the run would not "
                                  f"continue exactly")
        step = int(state["step"])
        changes = schedule_change(saved, int(state["total_steps"]), self.config, self.total_steps, step)
        if changes and not self.config.allow_schedule_change:
            raise ConfigError(f"--resume {path}: the learning-rate schedule of steps {step + 1}-{self.total_steps} "
                              f"would change: {'; '.join(changes)}; keep the options, or pass "
                              f"--allow-schedule-change to rebuild the schedule from step {step + 1}")
        weights = loaded["model"]
        params = dict(self.policy.named_parameters())
        if set(weights) != set(params):
            raise ValueError(f"--resume {path}: parameters differ from the model's "
                             f"(missing {sorted(set(params) - set(weights))[:5]}, "
                             f"unexpected {sorted(set(weights) - set(params))[:5]})")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        self.optimizer.load_state_dict(loaded["optimizer"])
        if changes:
            self.optimizer.rebuild_schedule()
            if self.is_main:
                logger.warning("--allow-schedule-change: %s; the schedule is rebuilt from step %d (next lr %.6g)",
                               "; ".join(changes), step + 1, self.optimizer.lr)
        rank_state = loaded["rank"]
        self.batcher.load_state_dict(rank_state["batcher"])
        ckpt.set_rng_state(rank_state["rng"])
        self.log_accumulator.sums = dict(rank_state["log_accumulator"]["sums"])
        self.log_accumulator.weights = dict(rank_state["log_accumulator"]["weights"])
        self.step = self._saved_step = step


# ============================================================================================ helpers ===
@contextlib.contextmanager
def _logged_stage(what: str, show: bool) -> Iterator[None]:
    """A log line before and after a collective write whose progress cannot be counted (one save call)."""
    started = time.perf_counter()
    if show:
        logger.info("writing %s ...", what)
    yield
    if show:
        logger.info("%s written in %.1f s", what, time.perf_counter() - started)


def _all_gather(value: Any) -> List[Any]:
    """`value` of every rank (a list of one on a single process)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [value]
    gathered: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _cat(tensors: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    return None if any(t is None for t in tensors) else torch.cat(tensors)
