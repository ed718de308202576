"""The training loop: `Trainer(TrainConfig(...)).fit()` on one process or under torchrun (TP x DP).

One optimiser step, per data-parallel rank r of W:
  1. this rank's slice of the global batch (rpo.data.PreferenceBatcher) is cut into A micro-batches
     (A = global / (micro x W)); each micro-batch is one concatenated forward of its chosen and rejected rows;
  2. per-sequence log-probs (rpo.models.logprobs) of the policy, and of the frozen reference (a second model with
     the same sharding, or looked up from `--precompute-reference`'s cache);
  3. the loss (rpo.losses) and its backward, normalised so that after Megatron DDP's gradient averaging the
     gradient is that of the loss of the whole global batch:
       - separable losses: micro-batch loss x rows_mb x W / rows_global (rows = chosen + rejected sequences);
       - losses with a global contrast (`--global-contrast`, the loss takes the data-parallel process group):
         the loss of the global matrix x W (see rpo.distributed.data_parallel_loss_scale); when the rank's
         batch spans several micro-batches, rpo.distributed.TwoPassContrast (scores of every micro-batch
         without grad, the global matrix, then a second forward per micro-batch with the score gradients);
  4. DDP gradient all-reduce, global-norm clipping, optimiser update, learning-rate schedule.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from rpo.train import checkpoint as ckpt
from rpo.train.config import ConfigError, TrainConfig
from rpo.train.metrics import MetricsLog, WeightedMean, all_reduce_sum, collective_device, plot_curves

logger = logging.getLogger("rpo.train")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

Batch = Dict[str, Any]


def default_dataset_path() -> Path:
    """The embedded default data: ../shared/data/paired.jsonl beside the repository."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "paired.jsonl"


def configure_logging(level: int = logging.INFO) -> None:
    """One-line logs (rank-prefixed under torchrun) for scripts that have not configured logging."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S")


class Callback:
    """Hooks into the loop (all optional). `record` is the metrics.jsonl object of the step (or None if the step
    was not logged)."""

    def on_step_end(self, trainer: "Trainer", step: int, record: Optional[Dict[str, Any]]) -> None:
        pass


class Trainer:
    """Preference training of a Megatron-core GPTModel (see the module docstring for one step).

    `fit()` is collective (every rank of the launch calls it) and returns the run summary on every rank.
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = ()):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer needs a TrainConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.callbacks = list(callbacks)

    # ================================================================================================ set-up ==
    def setup(self) -> None:
        """Parallel state, data, models, loss, optimiser, resume. Called by fit(); separate for tests."""
        from rpo.models import cpu_compat
        from rpo.models.parallel import init_parallel

        cfg = self.config
        megatron_logger = logging.getLogger("megatron.core")
        if megatron_logger.level == logging.NOTSET:
            megatron_logger.setLevel(logging.WARNING)  # its INFO lines list every parameter of every bucket
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            cpu_compat.apply()
            torch.set_flush_denormal(True)  # denormal gradients make CPU backward ~10x slower
        self.parallel = init_parallel(cfg.tensor_parallel, seed=cfg.seed)
        from megatron.core import parallel_state

        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size, self.dp_rank = self.parallel.dp_size, self.parallel.dp_rank
        self.rank = self.parallel.rank
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.dtype = self._resolve_dtype()
        self.accumulation = cfg.batch_layout(self.dp_size)
        self.rank_batch_size = cfg.global_batch_size // self.dp_size

        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache_root()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_checkpoints(self.checkpoint_dir)
        self._barrier()

        with self._main_first():  # rank 0 converts / downloads, the others then find the folder
            self.model_path = resolve_model_path(cfg.model, "--model") if cfg.model else _default_model_path()
            self.reference_path = (resolve_model_path(cfg.reference_model, "--reference-model")
                                   if cfg.reference_model else self.model_path)
        self.dataset_path = cfg.dataset or str(default_dataset_path())
        self.loss = self._build_loss()
        self.needs_embeddings = bool({"chosen_embeddings", "rejected_embeddings"} & self.loss.requires)
        self.global_loss = "process_group" in (self.loss.requires | self.loss.optional)
        self.two_pass = self.global_loss and self.accumulation > 1
        if self.is_main:
            resolved = replace(cfg, model=str(self.model_path), dataset=str(self.dataset_path),
                               cache_dir=str(self.cache_root))
            resolved.to_yaml(self.output_dir / "config.yaml")

        self._setup_data()
        self._setup_models()
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.batcher)))
        from rpo.train.optim import TrainOptimizer

        self.optimizer = TrainOptimizer(cfg, self.ddp_model, bf16=self.dtype == torch.bfloat16,
                                        total_steps=self.total_steps)
        self.metrics_log = MetricsLog(self.output_dir / "metrics.jsonl", enabled=self.is_main)
        self.step = 0
        self.log_accumulator = WeightedMean()
        self.history: List[Dict[str, Any]] = []
        if cfg.resume:
            self._resume(cfg.resume)
        elif self.is_main and self.metrics_log.path.exists():
            self.metrics_log.path.unlink()  # a fresh run in an old folder starts a fresh log
        self._barrier()

    def _resolve_dtype(self) -> torch.dtype:
        choice = self.config.dtype
        if choice == "auto":
            return torch.bfloat16 if self.cuda else torch.float32
        if choice == "bfloat16" and not self.cuda:
            logger.warning("--dtype bfloat16 on CPU: slow and inexact; float32 is the CPU default")
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]

    def _build_loss(self):
        from rpo.losses import LossConfigError, build_loss

        options = self.config.loss_build_options()
        try:
            loss = build_loss(self.config.loss, **options)
        except LossConfigError as error:
            raise ConfigError(f"--loss {self.config.loss}: {error}") from None
        if {"kl_policy_logps", "kl_reference_logps"} & loss.optional and getattr(self, "is_main", True):
            logger.warning("loss %s: the trainer passes no KL (mismatched-pair) log-probs, so KTO's reference "
                           "point z is 0", loss.name)
        if self.config.global_contrast and not ({"process_group"} & (loss.requires | loss.optional)):
            raise ConfigError(f"--global-contrast: loss {loss.name!r} has no global contrast (it does not take a "
                              f"process group); use a contrast loss such as rpo")
        return loss

    # --------------------------------------------------------------------------------------------- data ----
    def _setup_data(self) -> None:
        from transformers import AutoTokenizer

        from rpo.data import PreferenceBatcher

        cfg = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or self.model_path,
                                                       trust_remote_code=cfg.trust_remote_code)
        # Rank 0 first: it fills the embedding cache, the other ranks then only read it.
        with self._main_first():
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
        self.train_data, self.eval_data = train_set, eval_set
        tokenized, embeddings, _ = train_set
        if len(tokenized) < cfg.global_batch_size:
            raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is larger than the {len(tokenized)} "
                              f"training rows of {self.dataset_path}")
        self.batcher = PreferenceBatcher(tokenized, embeddings, self.rank_batch_size, self.dp_rank, self.dp_size,
                                         cfg.seed)
        self.eval_batcher = None
        if eval_set is not None:
            rows = len(eval_set[0])
            per_rank = min(cfg.eval_batch_size or cfg.micro_batch_size, rows // self.dp_size)
            if per_rank < 1:
                raise ConfigError(f"the evaluation data has {rows} rows, fewer than the {self.dp_size} "
                                  f"data-parallel ranks; raise --eval-split-fraction or pass --eval-dataset")
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
        dataset = load_preference_dataset(source, split=split, columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows)
        tokenized = tokenize_preference_dataset(dataset, self.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                                max_length=cfg.max_length)
        embeddings = None
        if self.needs_embeddings:
            kwargs = {"model": cfg.embedding_model} if cfg.embedding_model else {}
            embeddings = compute_prompt_embeddings(list(tokenized.rows["prompt"]),
                                                   cache_dir=self.cache_root / "prompt_embeddings", **kwargs)
        return tokenized, embeddings, str(source)

    def _split(self, data, fraction: float):
        """Seeded held-out split of (tokenized, embeddings, source) into train and eval parts."""
        from rpo.data import TokenizedPreferenceDataset

        tokenized, embeddings, source = data
        rows = len(tokenized)
        held_out = max(1, int(round(rows * fraction)))
        if held_out >= rows:
            raise ConfigError(f"--eval-split-fraction {fraction} leaves no training rows out of {rows}")
        order = np.random.default_rng([self.config.seed, 1]).permutation(rows)
        parts = []
        for indices in (np.sort(order[held_out:]), np.sort(order[:held_out])):
            subset = TokenizedPreferenceDataset(tokenized.rows.select(indices.tolist()), tokenized.kind,
                                                tokenized.pad_token_id, tokenized.report, tokenized.load_report)
            parts.append((subset, None if embeddings is None else embeddings[torch.as_tensor(indices)],
                          f"{source}[{'train' if len(parts) == 0 else 'eval'} split]"))
        return parts[0], parts[1]

    # ------------------------------------------------------------------------------------------- models ----
    def _setup_models(self) -> None:
        from rpo.models import load_policy, reference_model

        cfg = self.config
        policy, self.hf_config, _ = load_policy(self.model_path, cfg.tensor_parallel, self.dtype,
                                                trust_remote_code=cfg.trust_remote_code)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False)
        self.policy = policy
        self.ddp_model = DistributedDataParallel(config=policy.config, ddp_config=ddp_config, module=policy)
        self.reference = None
        self.reference_table: Dict[str, torch.Tensor] = {}
        if not self.loss.needs_reference:
            return
        if cfg.precompute_reference:
            for name, data in (("train", self.train_data), ("eval", self.eval_data)):
                if data is not None:
                    self.reference_table[name] = self._precomputed_reference(data[0], data[2])
            self.reference = None  # not kept: the cached log-probs replace it
        elif cfg.reference_model:
            self.reference = self._load_reference()
        else:
            # The policy's starting weights (taken before --resume loads the checkpointed ones).
            self.reference = reference_model(policy)

    def _load_reference(self):
        from rpo.models import load_policy, reference_model

        if not self.config.reference_model:
            return reference_model(self.policy)
        reference, _, _ = load_policy(self.reference_path, self.config.tensor_parallel, self.dtype,
                                      trust_remote_code=self.config.trust_remote_code)
        reference.requires_grad_(False)
        reference.eval()
        return reference

    # --------------------------------------------------------------------------------- reference cache ----
    def _reference_cache_file(self, tokenized) -> Path:
        digest = hashlib.sha256()
        digest.update(json.dumps([_model_fingerprint(self.reference_path), str(self.dtype),
                                  self.config.max_length, self.config.max_prompt_length]).encode())
        for field in tokenized.response_fields:
            for column in (f"{field}_input_ids", f"{field}_loss_mask"):
                for row in tokenized.rows[column]:
                    digest.update(np.asarray(row, dtype=np.int64).tobytes())
                    digest.update(b"|")
        return self.cache_root / "reference_logps" / f"{digest.hexdigest()[:32]}.safetensors"

    def _precomputed_reference(self, tokenized, source) -> torch.Tensor:
        """[rows, response fields] reference log-probs of every sequence: from the cache, or one pass now."""
        from safetensors.torch import load_file, save_file

        path = self._reference_cache_file(tokenized)
        # One decision for all ranks (a file appearing between two ranks' checks must not split them).
        decision = [path.is_file()]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            table = load_file(str(path))["logps"]
            if self.is_main:
                logger.info("reference log-probs of %s loaded from %s", source, path)
            return table
        # Without --reference-model the reference is the policy's starting weights: score with the policy itself
        # (this runs before training and before --resume loads checkpointed weights).
        model = self._load_reference() if self.config.reference_model else self.policy
        started = time.perf_counter()
        rows = len(tokenized)
        fields = tokenized.response_fields
        table = torch.zeros(rows, len(fields), dtype=torch.float64)
        mine = list(range(self.dp_rank, rows, self.dp_size))  # TP ranks of one DP rank share rows
        size = self.config.eval_batch_size or self.config.micro_batch_size
        from rpo.data import collate_preference_batch

        for start in range(0, len(mine), size):
            chunk = mine[start:start + size]
            for f, field in enumerate(fields):
                sequences = [tokenized.sequence(i, field) for i in chunk]
                batch = collate_preference_batch(sequences, [], chunk, None, paired=False,
                                                 pad_token_id=tokenized.pad_token_id)
                logps, _ = self._sequence_logps(model, batch, grad=False)
                table[torch.as_tensor(chunk), f] = logps.double().cpu()
        if self.dp_size > 1:  # every row was computed by exactly one DP rank
            table = table.to(collective_device(self.dp_group))
            dist.all_reduce(table, group=self.dp_group)
        table = table.float().cpu()
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            save_file({"logps": table.contiguous()}, str(tmp), metadata={"source": source})
            os.replace(tmp, path)
            logger.info("reference log-probs of %s: %d sequences in %.1f s, cached at %s", source,
                        rows * len(fields), time.perf_counter() - started, path)
        self._barrier()
        return table

    # ========================================================================================= forward ==
    def _sequence_logps(self, model, batch: Batch, grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence sums of response-token log-probs [R] (float32) and response token counts [R]."""
        from rpo.models.logprobs import sequence_logprobs

        tensors = {key: batch[key] for key in ("input_ids", "attention_mask", "loss_mask")}
        context = contextlib.nullcontext() if grad else torch.no_grad()
        with context:
            result = sequence_logprobs(model, tensors, return_token_logprobs=False)
        return result.sums.float(), result.counts

    def _reference_logps(self, batch: Batch, split: str) -> Optional[torch.Tensor]:
        if not self.loss.needs_reference:
            return None
        if self.reference is not None:
            return self._sequence_logps(self.reference, batch, grad=False)[0].detach()
        table = self.reference_table[split]
        row_ids = batch["row_ids"]
        m = batch["num_chosen"]
        if table.shape[1] == 2:  # paired: column 0 chosen, column 1 rejected
            values = torch.cat([table[row_ids[:m], 0], table[row_ids[m:], 1]])
        else:
            values = table[row_ids, 0]
        return values.to(self.device)

    def _loss_inputs(self, batch: Batch, policy: torch.Tensor, counts: torch.Tensor,
                     reference: Optional[torch.Tensor]) -> Dict[str, Any]:
        m = batch["num_chosen"]
        inputs = {
            "policy_chosen_logps": policy[:m], "policy_rejected_logps": policy[m:],
            "chosen_lengths": counts[:m], "rejected_lengths": counts[m:],
        }
        if reference is not None:
            inputs["reference_chosen_logps"] = reference[:m]
            inputs["reference_rejected_logps"] = reference[m:]
        if self.needs_embeddings:
            inputs["chosen_embeddings"] = batch["chosen_embeddings"].to(self.device)
            inputs["rejected_embeddings"] = batch["rejected_embeddings"].to(self.device)
        if self.global_loss:
            inputs["process_group"] = self.dp_group
        return inputs

    def _objective(self, output, inputs: Dict[str, Any], rows: int, rows_global: int) -> torch.Tensor:
        """What to back-propagate so that DDP's averaged gradient is the gradient of the global batch's loss.

        A separable loss (or term) is a mean over its rows: weight rows x W / rows_global. A global-contrast loss is
        already the global batch's loss on every rank, each rank holding the partial derivatives through its own
        sequences: weight W (rpo.distributed.data_parallel_loss_scale). In a combination such as
        `rpo+0.2*sft --global-contrast`, the separable terms are re-weighted individually.
        """
        from rpo.distributed import data_parallel_loss_scale

        world = data_parallel_loss_scale(self.dp_group)
        separable_weight = rows * world / rows_global
        if not self.global_loss:
            return output.loss * separable_weight
        objective = output.loss * world
        for _, weight, term in getattr(self.loss, "terms", ()):
            if not ({"process_group"} & (term.requires | term.optional)):
                objective = objective + weight * (separable_weight - world) * term(**inputs).loss
        return objective

    # ============================================================================================ step ===
    def _micro_batches(self, batch: Batch, parts: int) -> List[Batch]:
        """Split a rank batch into `parts` micro-batches (pairs stay together), each trimmed to its own length."""
        m, n = batch["num_chosen"], batch["num_rejected"]
        if parts == 1:
            return [batch]
        if batch["paired"]:
            bounds = [(a, b, a, b) for a, b in _spread(m, parts)]
        else:
            bounds = [(a, b, c, d) for (a, b), (c, d) in zip(_spread(m, parts), _spread(n, parts))]
        micro = []
        for a, b, c, d in bounds:
            rows = torch.cat([torch.arange(a, b), m + torch.arange(c, d)])
            length = max(1, int(batch["attention_mask"][rows].sum(1).max())) if len(rows) else 1
            sub = {key: batch[key][rows, :length] for key in ("input_ids", "attention_mask", "loss_mask")}
            sub.update(num_chosen=b - a, num_rejected=d - c, row_ids=batch["row_ids"][rows], paired=batch["paired"],
                       chosen_embeddings=_rows(batch["chosen_embeddings"], a, b),
                       rejected_embeddings=_rows(batch["rejected_embeddings"], c, d))
            micro.append(sub)
        return micro

    def train_step(self, batch: Batch) -> Dict[str, Any]:
        """One optimiser step on this rank's slice of the global batch; returns the step's reduced metrics."""
        started = time.perf_counter()
        self.ddp_model.train()
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.lr
        micro = self._micro_batches(batch, self.accumulation)
        rows = batch["num_chosen"] + batch["num_rejected"]
        rows_global, tokens = all_reduce_sum([rows, int(batch["attention_mask"].sum())], self.dp_group)
        metrics = WeightedMean()
        if self.two_pass:
            self._two_pass_step(micro, rows, rows_global, metrics)
        else:
            for mb in micro:
                policy, counts = self._sequence_logps(self.ddp_model, mb, grad=True)
                inputs = self._loss_inputs(mb, policy, counts, self._reference_logps(mb, "train"))
                output = self.loss(**inputs)
                mb_rows = mb["num_chosen"] + mb["num_rejected"]
                self._objective(output, inputs, mb_rows, rows_global).backward()
                metrics.add({"loss": output.loss, **output.metrics}, weight=mb_rows)
        self.ddp_model.finish_grad_sync()
        grad_norm = self.optimizer.step()
        reduced = metrics.reduce(self.dp_group)
        step_time = time.perf_counter() - started
        reduced.update(lr=lr, grad_norm=grad_norm, step_time=step_time, tokens_per_s=tokens / step_time)
        return reduced

    def _two_pass_step(self, micro: List[Batch], rows: int, rows_global: int, metrics: WeightedMean) -> None:
        from rpo.distributed import TwoPassContrast

        references = [self._reference_logps(mb, "train") for mb in micro]
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
            policy, mb_counts = self._sequence_logps(self.ddp_model, mb, grad=torch.is_grad_enabled())
            if len(counts) < len(micro):
                counts.append(mb_counts)
            return chosen(policy, mb), rejected(policy, mb)

        def step_loss(chosen_scores, rejected_scores):
            m = whole["num_chosen"]
            ordered = lambda parts: torch.cat([chosen(p, mb) for p, mb in zip(parts, micro)]  # noqa: E731
                                              + [rejected(p, mb) for p, mb in zip(parts, micro)])
            policy = torch.cat([chosen_scores, rejected_scores])
            reference = ordered(references) if references[0] is not None else None
            inputs = self._loss_inputs(whole, policy, ordered(counts), reference)
            assert inputs["policy_chosen_logps"].shape[0] == m
            output = self.loss(**inputs)
            outputs.append(output)
            return self._objective(output, inputs, rows, rows_global)

        TwoPassContrast(scores, step_loss).step(micro)
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
        for index in range(len(self.eval_batcher)):
            batch = self.eval_batcher.batch(0, index)
            policy, counts = self._sequence_logps(self.ddp_model, batch, grad=False)
            inputs = self._loss_inputs(batch, policy, counts, self._reference_logps(batch, "eval"))
            output = self.loss(**inputs)
            metrics.add({"loss": output.loss, **output.metrics}, weight=batch["num_chosen"] + batch["num_rejected"])
        self.ddp_model.train()
        return {f"eval/{key}": value for key, value in metrics.reduce(self.dp_group).items()}

    # ============================================================================================= fit ===
    def fit(self) -> Dict[str, Any]:
        """Train to --max-steps (or --epochs), evaluate, checkpoint, save final/; returns the run summary."""
        if not hasattr(self, "batcher"):
            self.setup()
        cfg = self.config
        started = time.perf_counter()
        start_step = self.step
        tokens_seen = 0.0
        eval_metrics: Dict[str, float] = {}
        bar = self._progress_bar(start_step)
        batches = self._batches()
        try:
            while self.step < self.total_steps:
                batch = next(batches)
                step_metrics = self.train_step(batch)
                self.step += 1
                tokens_seen += step_metrics["tokens_per_s"] * step_metrics["step_time"]
                timing = {k: step_metrics.pop(k) for k in ("lr", "grad_norm", "step_time", "tokens_per_s")}
                self.log_accumulator.add(step_metrics)
                last = self.step == self.total_steps
                record = None
                evaluate = self.eval_batcher is not None and (
                    last or (cfg.eval_every and self.step % cfg.eval_every == 0))
                if evaluate:
                    eval_metrics = self.evaluate()
                if self.step % cfg.log_every == 0 or last or evaluate:
                    record = {"step": self.step, "epoch": self._epoch_position(),
                              **self.log_accumulator.reduce(), **timing, **(eval_metrics if evaluate else {})}
                    self.log_accumulator = WeightedMean()
                    self.metrics_log.write(record)
                    self.history.append(record)
                    self._report(bar, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(_postfix(step_metrics, timing), refresh=False)
                if cfg.save_every and (self.step % cfg.save_every == 0) and not last:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback.on_step_end(self, self.step, record)
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - started
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save_checkpoint()
        final_dir = None
        if cfg.save_final:
            from rpo.models.hf_checkpoint import save_hf

            final_dir = self.output_dir / "final"
            save_hf(self.ddp_model, self.hf_config, final_dir, tokenizer_src=self.tokenizer)
        curves = None
        if self.is_main:
            curves = plot_curves(self.metrics_log.path, self.output_dir / "curves.png")
        summary = {
            "steps": self.step, "steps_this_run": self.step - start_step, "time_s": elapsed,
            "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else float("nan"),
            "final_train_metrics": self.history[-1] if self.history else {},
            "final_eval_metrics": eval_metrics, "skipped_updates": self.optimizer.skipped_updates,
            "output_dir": str(self.output_dir), "metrics": str(self.metrics_log.path),
            "curves": str(curves or self.output_dir / "curves.png"), "checkpoints": str(self.checkpoint_dir),
            "final_model": str(final_dir) if final_dir else None,
        }
        if self.is_main:
            logger.info("%s", format_summary(summary))
        self._barrier()
        return summary

    def _batches(self) -> Iterator[Batch]:
        while True:
            yield from self.batcher

    def _epoch_position(self) -> float:
        state = self.batcher.state_dict()
        return state["epoch"] + state["batch_in_epoch"] / len(self.batcher)

    def _progress_bar(self, initial: int):
        if not (self.is_main and self.config.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=initial, desc=f"{self.loss.name}", unit="step",
                    dynamic_ncols=True)

    def _report(self, bar, record: Dict[str, Any]) -> None:
        if bar is None and self.is_main:
            logger.info("%s", format_record(record, self.total_steps))
        elif bar is not None and any(key.startswith("eval/") for key in record):
            bar.write(format_record(record, self.total_steps))

    # ===================================================================================== checkpoints ===
    def save_checkpoint(self) -> Path:
        """Collective: model, optimiser, scheduler, RNG, data position and log state of this step."""
        unique_copy = self.dp_rank == 0  # DP replicas hold identical weights and optimiser state
        model_state = {name: p for name, p in self.policy.named_parameters()} if unique_copy else None
        rank_state = {"rng": ckpt.rng_state(), "batcher": self.batcher.state_dict(),
                      "log_accumulator": {"sums": self.log_accumulator.sums,
                                          "weights": self.log_accumulator.weights}}
        trainer_state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.parallel.world_size,
                         "tensor_parallel": self.parallel.tp_size, "config": self.config.to_dict()}
        path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, trainer_state=trainer_state,
                                    model_state=model_state,
                                    optimizer_state=self.optimizer.state_dict() if unique_copy else None,
                                    rank_state=rank_state, tp_rank=self.parallel.tp_rank,
                                    keep=self.config.keep_checkpoints)
        if self.is_main:
            logger.debug("checkpoint written: %s", path)
        return path

    def _resume(self, where: str) -> None:
        path = ckpt.latest_checkpoint(self.checkpoint_dir) if where == "latest" else Path(where)
        if path is None:
            if self.is_main:
                logger.info("--resume: no checkpoint in %s yet; starting from step 0", self.checkpoint_dir)
            if self.is_main and self.metrics_log.path.exists():
                self.metrics_log.path.unlink()
            return
        state = ckpt.load_trainer_state(path)
        if (state["world_size"], state["tensor_parallel"]) != (self.parallel.world_size, self.parallel.tp_size):
            raise ConfigError(f"--resume {path}: written by {state['world_size']} processes with tensor-parallel "
                              f"{state['tensor_parallel']}; this launch has {self.parallel.world_size} and "
                              f"{self.parallel.tp_size}")
        saved = dict(state["config"])
        for key in ("global_batch_size", "micro_batch_size", "seed", "loss", "optimizer"):
            if saved.get(key) != getattr(self.config, key):
                raise ConfigError(f"--resume {path}: --{key.replace('_', '-')} was {saved.get(key)!r} in the "
                                  f"checkpointed run, now {getattr(self.config, key)!r}; the run would not "
                                  f"continue exactly")
        weights = ckpt.load_model_state(path, self.parallel.tp_rank)
        params = dict(self.policy.named_parameters())
        if set(weights) != set(params):
            raise ValueError(f"--resume {path}: parameters differ from the model's "
                             f"(missing {sorted(set(params) - set(weights))[:5]}, "
                             f"unexpected {sorted(set(weights) - set(params))[:5]})")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        self.optimizer.load_state_dict(ckpt.load_optimizer_state(path, self.parallel.tp_rank))
        rank_state = ckpt.load_rank_state(path, self.rank)
        self.batcher.load_state_dict(rank_state["batcher"])
        ckpt.set_rng_state(rank_state["rng"])
        self.log_accumulator.sums = dict(rank_state["log_accumulator"]["sums"])
        self.log_accumulator.weights = dict(rank_state["log_accumulator"]["weights"])
        self.step = int(state["step"])
        self.metrics_log.truncate_after(self.step)
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.step)

    # ========================================================================================== utils ===
    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    @contextlib.contextmanager
    def _main_first(self):
        if not self.is_main:
            self._barrier()
        try:
            yield
        finally:
            if self.is_main:
                self._barrier()


# ============================================================================================ helpers ===
def _spread(total: int, parts: int) -> List[Tuple[int, int]]:
    edges = [(i * total) // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _rows(tensor: Optional[torch.Tensor], start: int, stop: int) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[start:stop]


def _cat(tensors: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    return None if any(t is None for t in tensors) else torch.cat(tensors)


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


def _default_cache_root() -> Path:
    return Path(os.environ.get("RPO_CACHE_DIR", Path.home() / ".cache" / "rpo"))


def _default_model_path() -> str:
    from rpo.models.default_model import default_model_path

    return str(default_model_path())


def _model_fingerprint(path: str) -> List[Any]:
    """Identity of a model for cache keys: a local folder's weight/config files (name, size, mtime), else the name."""
    folder = Path(path)
    if not folder.is_dir():
        return [str(path)]
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return [str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _postfix(metrics: Dict[str, float], timing: Dict[str, float]) -> Dict[str, str]:
    out = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
    if "rewards/accuracies" in metrics:
        out["acc"] = f"{metrics['rewards/accuracies']:.3f}"
    out["tok/s"] = f"{timing['tokens_per_s']:.0f}"
    return out


def format_record(record: Dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "lr", "tokens_per_s",
                "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        if key in record:
            value = record[key]
            parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def format_summary(summary: Dict[str, Any]) -> str:
    lines = [f"done: {summary['steps']} steps ({summary['steps_this_run']} this run) in {summary['time_s']:.1f} s, "
             f"{summary['tokens_per_s']:.0f} tokens/s"]
    train = summary["final_train_metrics"]
    if train:
        lines.append("  last train step: " + format_record(train, summary["steps"]))
    if summary["final_eval_metrics"]:
        lines.append("  final eval: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["final_eval_metrics"].items()))
    lines.append(f"  outputs: {summary['output_dir']} (metrics.jsonl, curves.png, checkpoints/"
                 + (", final/" if summary["final_model"] else "") + ")")
    return "\n".join(lines)
