"""rpo's losses inside TRL: `RPOTrainer`, a `trl.DPOTrainer` whose loss is any `rpo.losses.build_loss` spec.

The one-class change for a TRL user (docs/trl.md):

    from rpo.integrations.trl import RPOTrainer          # instead of: from trl import DPOTrainer
    trainer = RPOTrainer(model, args=DPOConfig(...), train_dataset=..., processing_class=tokenizer,
                         peft_config=LoraConfig(...))    # loss="rpo" by default; any spec: "simpo-rpo", "rpo+0.2*sft"

Everything else is TRL's: its datasets and tokenisation, its collator, its fused LM-head log-probs, its reference
model (or, with PEFT, the base model with the adapter disabled, or TRL's precomputed reference log-probs), its
optimiser, accelerate/DDP/FSDP/DeepSpeed, checkpoints and logs. One step of `compute_loss`:

  1. the policy's per-sequence log-probs (sums over completion tokens) from TRL's fused LM head, and the
     reference's from `DPOTrainer.compute_ref_log_probs` (or the batch's `ref_*_logps` when precomputed);
  2. the prompt embeddings of a loss that weighs pairs by prompt similarity (rpo's default weighting), attached to
     the batch by `PromptEmbeddingCollator` from the same cache as the Megatron trainer (rpo.data.embeddings);
  3. the loss, built by `rpo.losses.resolve_loss` as every entry point builds it (DPOConfig's beta for terms that
     set none); with `global_contrast` the contrast matrix spans every data-parallel rank's rows of the
     micro-batch (rpo.distributed), and the backward is rpo.distributed's data-parallel objective, as in rpo's
     Megatron trainer, so that after DDP's/FSDP's gradient averaging the gradient is that of the global
     micro-batch's loss;
  4. TRL's metric names (rewards/*, logps/*, logits/*, entropy, mean_token_accuracy, num_tokens) plus the loss's
     own metrics (contrast/* for a contrast-matrix loss), averaged over the data-parallel ranks.

Tested with trl==1.16.0 (TESTED_TRL_VERSION) and peft==0.21.2.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

import torch

try:
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("rpo.integrations.trl needs TRL: pip install 'rpo[trl]' (tested with trl==1.16.0)") from error

from rpo.data.embeddings import DEFAULT_EMBEDDING_MODEL, PromptEmbeddingCache, prompt_text
from rpo.distributed import data_parallel_loss_scale, data_parallel_objective
from rpo.losses import Loss, LossOutput, resolve_loss

TESTED_TRL_VERSION = "1.16.0"
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
# Batch entries that are not model inputs (TRL's own and the embeddings this module adds).
_NOT_MODEL_INPUTS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", PROMPT_EMBEDDINGS_KEY})
# DPOConfig fields that choose or change TRL's own loss; the rpo loss replaces it, so a non-default value would
# be silently ignored. Field -> its default.
_TRL_LOSS_FIELDS = {"loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None,
                    "f_divergence_type": "reverse_kl", "label_smoothing": 0.0, "use_weighting": False}

__all__ = ["PROMPT_EMBEDDINGS_KEY", "PromptEmbeddingCollator", "RPOConfig", "RPOTrainer", "TESTED_TRL_VERSION"]


@dataclasses.dataclass
class RPOConfig(DPOConfig):
    """`trl.DPOConfig` plus the rpo loss (for TrlParser CLIs and YAML configs; RPOTrainer also takes a DPOConfig).

    `beta` is DPOConfig's: it goes to every loss (or term of a combination) that takes a beta, unless
    `rpo_loss_options` sets one (simpo-rpo's usual β is 2.0, not DPOConfig's default 0.1).
    """

    rpo_loss: str = dataclasses.field(default="rpo", metadata={
        "help": "The rpo.losses spec: a registered name (rpo, rpo-z, simpo-rpo, dpo, ipo, simpo, kto, sft), a "
                "combination such as 'rpo+0.2*sft', or a plugin 'module:function' / 'path.py:function'."})
    rpo_loss_options: dict[str, Any] | str | None = dataclasses.field(default=None, metadata={
        "help": "Options of the loss, a dict (JSON on the command line), e.g. "
                "'{\"weighting\": \"embedding\", \"tau\": 0.5}'. See docs/losses.md."})
    global_contrast: bool = dataclasses.field(default=False, metadata={
        "help": "Contrast every data-parallel rank's rows of the micro-batch in one matrix (a contrast loss only)."})
    embedding_model: str = dataclasses.field(default=DEFAULT_EMBEDDING_MODEL, metadata={
        "help": "The sentence-transformers model of the prompt embeddings (embedding weighting)."})
    embedding_cache_dir: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "Where prompt embeddings are cached (default: $RPO_CACHE_DIR/prompt_embeddings)."})

    def __post_init__(self):
        if isinstance(self.rpo_loss_options, str):
            try:
                self.rpo_loss_options = json.loads(self.rpo_loss_options)
            except json.JSONDecodeError as error:
                raise ValueError(f"rpo_loss_options must be a JSON object, got {self.rpo_loss_options!r}: "
                                 f"{error}") from None
        if self.rpo_loss_options is not None and not isinstance(self.rpo_loss_options, Mapping):
            raise ValueError(f"rpo_loss_options must be a dict of loss options, got {self.rpo_loss_options!r}")
        super().__post_init__()


class PromptEmbeddingCollator:
    """Wraps a preference collator: the batch gains `prompt_embeddings` [B, D], row i the embedding of example
    i's prompt (a string, or messages rendered by rpo.data.messages_to_text), from `cache`.

    Texts the cache already holds are only looked up; RPOTrainer fills the cache for its datasets up front, so the
    embedding model is never loaded during training (an IterableDataset's prompts are embedded when first seen).
    """

    def __init__(self, collator, cache: PromptEmbeddingCache):
        self.collator, self.cache = collator, cache

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        missing = [i for i, example in enumerate(examples) if "prompt" not in example]
        if missing:
            raise KeyError(f"PromptEmbeddingCollator: example {missing[0]} has no 'prompt' (its keys: "
                           f"{sorted(examples[missing[0]])}); keep the prompt column for the embedding weighting")
        batch = self.collator(examples)
        batch[PROMPT_EMBEDDINGS_KEY] = self.cache.embed([prompt_text(example["prompt"]) for example in examples],
                                                        progress=False)
        return batch


def build_trl_loss(spec: str | Loss, options: Optional[Mapping[str, Any]], beta: float,
                   global_contrast: bool) -> Loss:
    """The rpo loss of a TRL run: `spec` with `options` through rpo.losses.resolve_loss, DPOConfig's `beta` for
    every term that sets none."""
    if isinstance(spec, Loss):
        if options:
            raise ValueError("RPOTrainer: loss_options go with a loss spec (a string), not with a built Loss")
        loss = spec
    else:
        options = dict(options or {})
        if global_contrast:
            options["global_contrast"] = True
        loss = resolve_loss(spec, options, default_beta=beta)
    if global_contrast and not loss.is_global:
        raise ValueError(f"RPOTrainer: global_contrast=True, but loss {loss.name!r} has no global contrast; use a "
                         f"contrast loss such as rpo")
    return loss


def _check_trl_loss_fields(args: DPOConfig) -> None:
    changed = {name: getattr(args, name) for name, default in _TRL_LOSS_FIELDS.items()
               if getattr(args, name) != default}
    if changed:
        settings = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        raise ValueError(f"RPOTrainer computes its loss with rpo.losses, so DPOConfig's {settings} would be ignored; "
                         f"leave them at their defaults and choose the loss with loss=... (or RPOConfig.rpo_loss)")


class RPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` with an rpo.losses loss (see the module docstring).

    loss:          a build_loss spec or a built `rpo.losses.Loss`; default `args.rpo_loss` for an RPOConfig, else
                   "rpo" (the paper's contrast matrix with prompt-embedding weights).
    loss_options:  the loss's options (default `args.rpo_loss_options`); `args.beta` is added for a loss taking
                   a beta.
    global_contrast, embedding_model, embedding_cache_dir: default the RPOConfig fields (False, MiniLM, the
                   rpo cache).
    Every other argument is DPOTrainer's.
    """

    _tag_names = ["trl", "dpo", "rpo"]

    def __init__(self, model, ref_model=None, args: Optional[DPOConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, *, loss: str | Loss | None = None,
                 loss_options: Optional[Mapping[str, Any]] = None, global_contrast: Optional[bool] = None,
                 embedding_model: Optional[str] = None, embedding_cache_dir: Optional[str] = None, **kwargs):
        if args is None:
            args = RPOConfig(output_dir="rpo-trl")

        def setting(value, name, default):
            return value if value is not None else getattr(args, name, default)

        _check_trl_loss_fields(args)
        self.global_contrast = bool(setting(global_contrast, "global_contrast", False))
        self.rpo_loss = build_trl_loss(setting(loss, "rpo_loss", "rpo"),
                                       setting(loss_options, "rpo_loss_options", None), args.beta,
                                       self.global_contrast)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         **kwargs)
        self.contrast_group = self._contrast_group() if self.global_contrast else None
        self.prompt_embeddings = None
        if self.rpo_loss.needs_embeddings:
            self.prompt_embeddings = PromptEmbeddingCache(setting(embedding_cache_dir, "embedding_cache_dir", None),
                                                          setting(embedding_model, "embedding_model",
                                                                  DEFAULT_EMBEDDING_MODEL))
            self._embed_dataset_prompts()
            self.data_collator = PromptEmbeddingCollator(self.data_collator, self.prompt_embeddings)

    # ------------------------------------------------------------------------------------------- set-up ----
    def _contrast_group(self):
        """The process group of the global contrast: all ranks under plain data parallelism (DDP, FSDP, ZeRO),
        None on one process."""
        if self.accelerator.num_processes == 1:
            return None
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and parallelism.non_data_parallel_size > 1:
            raise ValueError("RPOTrainer: global_contrast supports data parallelism only (DDP, FSDP, DeepSpeed "
                             f"ZeRO); this run has a parallelism config {parallelism} with tensor/context parallel "
                             f"ranks")
        return torch.distributed.group.WORLD

    def _embed_dataset_prompts(self) -> None:
        """Fill the embedding cache with every prompt of the (map-style) datasets; rank 0 computes, the others
        then read the cache it wrote."""
        datasets = [self.train_dataset]
        if isinstance(self.eval_dataset, Mapping):
            datasets += list(self.eval_dataset.values())
        elif self.eval_dataset is not None:
            datasets.append(self.eval_dataset)
        texts = [prompt_text(prompt) for dataset in datasets if hasattr(dataset, "column_names")
                 for prompt in dataset["prompt"]]
        if texts:
            with self.accelerator.main_process_first():
                self.prompt_embeddings.embed(texts, progress=self.accelerator.is_main_process)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # The prompt text reaches the collator, which looks up its embedding.
        if self.rpo_loss.needs_embeddings and "prompt" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "prompt"]

    # ------------------------------------------------------------------------------------------- the loss --
    def _reference_logps(self, inputs) -> tuple:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        # TRL's reference forward: the ref model, or the policy with its PEFT adapter disabled.
        batch = {key: value for key, value in inputs.items() if key != PROMPT_EMBEDDINGS_KEY}
        return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        model_inputs = {key: value for key, value in inputs.items() if key not in _NOT_MODEL_INPUTS}
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_inputs, labels=labels, use_cache=False, fused_lm_head=True)
        token_mask = completion_mask[:, 1:]  # the mask of the scored (next) tokens
        # Prompt-learning adapters prepend virtual tokens: keep the positions of the real ones.
        token_logps = outputs.log_probs[:, -token_mask.shape[1]:]
        logps, lengths = token_logps.sum(dim=1), token_mask.sum(dim=1)
        pairs = logps.shape[0] // 2  # TRL's batch: the chosen rows, then the rejected rows
        batch = {"policy_chosen_logps": logps[:pairs], "policy_rejected_logps": logps[pairs:],
                 "chosen_lengths": lengths[:pairs], "rejected_lengths": lengths[pairs:]}
        if self.rpo_loss.needs_reference:
            batch["reference_chosen_logps"], batch["reference_rejected_logps"] = self._reference_logps(inputs)
        if self.rpo_loss.needs_embeddings:
            embeddings = inputs[PROMPT_EMBEDDINGS_KEY].to(logps.device)
            batch["chosen_embeddings"] = batch["rejected_embeddings"] = embeddings
        if self.contrast_group is not None:
            batch["process_group"] = self.contrast_group
            if "chosen_tokens_per_row" in self.rpo_loss.optional:  # a token mean (sft) of the global micro-batch
                totals = torch.stack([lengths[:pairs].sum(), torch.tensor(2 * pairs, device=lengths.device)]).double()
                torch.distributed.all_reduce(totals, group=self.contrast_group)
                batch["chosen_tokens_per_row"] = (totals[0] / totals[1]).item()
        output = self.rpo_loss(**batch)
        if self.aux_loss_enabled:  # the MoE router loss is a mean over this rank's tokens: separable
            output = LossOutput(output.loss + self.router_aux_loss_coef * outputs.aux_loss, output.metrics,
                                output.global_loss)
        rows_global = self._record_metrics(mode, output, outputs, inputs, token_mask, pairs)
        objective = data_parallel_objective(output.loss, output.global_loss, rows=2 * pairs, rows_global=rows_global,
                                            world=data_parallel_loss_scale(self.contrast_group))
        # TRL logs (and averages over ranks) the value it gets back: the loss. The gradient is the objective's.
        value = objective + (output.loss - objective).detach()
        if return_outputs:
            with torch.no_grad():  # the fused head gives no logits; compute_metrics needs them
                return value, model(**model_inputs)
        return value

    # ------------------------------------------------------------------------------------------- metrics ---
    def _record_metrics(self, mode: str, output: LossOutput, outputs, inputs, token_mask, pairs: int) -> int:
        """Append this step's metrics to TRL's `_metrics` (which `log` averages over steps), reduced over the
        data-parallel ranks in one collective; returns the global number of rows (chosen + rejected).

        The loss's metrics are means over this rank's pairs (or already global: contrast/* of a global
        contrast), so they are averaged weighted by pairs; the token metrics are ratios of token sums.
        """
        seq_len = token_mask.shape[1]
        chosen_mask, rejected_mask = token_mask.bool().chunk(2, dim=0)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
        chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
        names = sorted(output.metrics)
        device = output.loss.device
        as_sum = lambda value: torch.as_tensor(value).detach().to(device=device, dtype=torch.float64)  # noqa: E731
        local = torch.stack([as_sum(value) for value in (
            2 * pairs,
            (outputs.entropy[:, -seq_len:].detach() * token_mask).sum(), token_mask.sum(),
            chosen_logits[chosen_mask].sum(), chosen_mask.sum(),
            rejected_logits[rejected_mask].sum(), rejected_mask.sum(),
            (chosen_top1 & chosen_mask).sum(),
            inputs["attention_mask"].sum(),
            *[as_sum(output.metrics[name]) * pairs for name in names])])
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        (rows, entropy, tokens, chosen_logit_sum, chosen_tokens, rejected_logit_sum, rejected_tokens, top1,
         attended), loss_sums = total[:9], total[9:]
        ratio = lambda numerator, denominator: numerator / denominator if denominator > 0 else 0.0  # noqa: E731
        metrics = self._metrics[mode]
        metrics["entropy"].append(ratio(entropy, tokens))
        metrics["logits/chosen"].append(ratio(chosen_logit_sum, chosen_tokens))
        metrics["logits/rejected"].append(ratio(rejected_logit_sum, rejected_tokens))
        metrics["mean_token_accuracy"].append(ratio(top1, chosen_tokens))
        if mode == "train":
            self._total_train_tokens += int(attended) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for name, value in zip(names, loss_sums):
            metrics[name].append(ratio(value, rows / 2))
        return int(rows)
