"""Cached-score two-pass contrast across gradient-accumulation microbatches (GradCache-style).

The contrast loss couples every chosen answer with every rejected answer of the step, so it cannot be split into
independent per-microbatch losses. Instead:

  pass 1: run `score_fn` on every microbatch without grad (no activations kept) and cache the scores;
  loss:   build the contrast matrix of the whole step (global over the DP group when `loss_fn` is global) on
          leaf copies of the cached scores and get g = dL/dscore for every sequence;
  pass 2: re-run `score_fn` on each microbatch with grad and back-propagate Σ_i g_i · score_i, which puts exactly
          dL/dθ (through that microbatch's sequences) into the parameters' .grad.

Cost: one extra forward per microbatch (pass 1), i.e. about +1/3 of the compute of a forward + backward step;
peak activation memory stays that of one microbatch; the cache is 2 scalars per sequence. Pass 2 replays the RNG
state each microbatch had in pass 1 (the default generators, and the named states of any `rng_state_trackers`, such
as megatron's model-parallel RNG tracker that its attention dropout draws from), so dropout masks agree; the
forward must otherwise be deterministic.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence, Tuple

import torch

ScoreFn = Callable[[Any], Tuple[torch.Tensor, torch.Tensor]]
EmbeddingFn = Callable[[Any], Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TwoPassResult:
    loss: torch.Tensor             # the step's (global) loss, detached and unscaled
    chosen_scores: torch.Tensor    # this rank's chosen scores of all microbatches, in order, detached
    rejected_scores: torch.Tensor  # this rank's rejected scores of all microbatches, in order, detached


class _ReplayableRng:
    """RNG state (CPU, every initialised CUDA device, each tracker's named states) captured before a pass-1
    forward."""

    def __init__(self, trackers: Sequence[Any] = ()):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.trackers = tuple(trackers)
        self.tracker_states = [tracker.get_states() for tracker in self.trackers]

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        after_pass_1 = [tracker.get_states() for tracker in self.trackers]
        with torch.random.fork_rng(devices=devices):  # restores the post-pass-1 state afterwards
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            # A copy each time: a tracker stores the dict it is given and advances its entries.
            for tracker, states in zip(self.trackers, self.tracker_states):
                tracker.set_states(dict(states))
            try:
                yield
            finally:
                for tracker, states in zip(self.trackers, after_pass_1):
                    tracker.set_states(states)


class TwoPassContrast:
    """One optimizer step's contrast loss over several microbatches, with exact gradients.

    score_fn(microbatch) -> (chosen_scores [M_k], rejected_scores [N_k]): the rewards of the microbatch's answers
        (differentiable w.r.t. the model; called twice per microbatch, once without and once with grad).
    loss_fn(chosen_scores, rejected_scores, **embeddings) -> scalar: the contrast loss of the whole step, e.g.
        functools.partial(rpo.distributed.global_contrast_loss, beta=0.1, process_group=dp_group) for a global
        matrix over the data-parallel group, or functools.partial(rpo.ops.contrast_loss, beta=0.1) for one rank.
    embedding_fn(microbatch) -> (chosen_embeddings [M_k, D], rejected_embeddings [N_k, D]), optional: the prompt
        embeddings for "embedding" weighting; passed to loss_fn as chosen_embeddings=, rejected_embeddings=.
    loss_scale: multiplies the loss before backward; under a DP wrapper that averages gradients pass
        rpo.distributed.data_parallel_loss_scale(dp_group) (= W) so .grad is the gradient of the global loss.
    no_sync: the DP wrapper's `no_sync` (e.g. ddp_model.no_sync); every microbatch but the last runs pass 2
        inside it, so gradients are all-reduced once per step.
    rng_state_trackers: objects with get_states() -> dict and set_states(dict) whose named RNG states the forward
        also draws from (megatron.core.tensor_parallel.get_cuda_rng_tracker()); replayed in pass 2 like the
        default generators.

    step(microbatches) accumulates into .grad (zero it before, call optimizer.step() after) and returns a
    TwoPassResult. In a DP group every rank must call step with the same number of microbatches (a microbatch may
    hold 0 answers of either kind).
    """

    def __init__(self, score_fn: ScoreFn, loss_fn: Callable[..., torch.Tensor], *,
                 embedding_fn: Optional[EmbeddingFn] = None, loss_scale: float = 1.0,
                 no_sync: Optional[Callable[[], ContextManager]] = None, rng_state_trackers: Sequence[Any] = ()):
        self.score_fn = score_fn
        self.rng_state_trackers = tuple(rng_state_trackers)
        self.loss_fn = loss_fn
        self.embedding_fn = embedding_fn
        self.loss_scale = loss_scale
        self.no_sync = no_sync

    def _scores(self, microbatch, index: int, pass_name: str):
        scores = self.score_fn(microbatch)
        if not (isinstance(scores, (tuple, list)) and len(scores) == 2):
            raise TypeError(f"score_fn must return (chosen_scores, rejected_scores); microbatch {index} "
                            f"({pass_name}) returned {type(scores).__name__}")
        for name, tensor in zip(("chosen_scores", "rejected_scores"), scores):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"score_fn: {name} of microbatch {index} ({pass_name}) must be a 1-D tensor, "
                                 f"got {shape}")
        return scores

    def _embedding_kwargs(self, microbatches: Sequence[Any]) -> dict:
        if self.embedding_fn is None:
            return {}
        pairs = [self.embedding_fn(microbatch) for microbatch in microbatches]
        return {"chosen_embeddings": torch.cat([chosen for chosen, _ in pairs]),
                "rejected_embeddings": torch.cat([rejected for _, rejected in pairs])}

    def step(self, microbatches: Sequence[Any]) -> TwoPassResult:
        if len(microbatches) == 0:
            raise ValueError("TwoPassContrast.step: got no microbatches")
        # Pass 1: scores only.
        cached_chosen, cached_rejected, rng_states = [], [], []
        with torch.no_grad():
            for index, microbatch in enumerate(microbatches):
                rng_states.append(_ReplayableRng(self.rng_state_trackers))
                chosen, rejected = self._scores(microbatch, index, "pass 1")
                cached_chosen.append(chosen.detach())
                cached_rejected.append(rejected.detach())

        # The step's loss on leaf copies of the cached scores: dL/dscore for every sequence.
        chosen_leaf = torch.cat(cached_chosen).requires_grad_(True)
        rejected_leaf = torch.cat(cached_rejected).requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(chosen_leaf, rejected_leaf, **self._embedding_kwargs(microbatches))
            grad_chosen, grad_rejected = torch.autograd.grad(loss * self.loss_scale, (chosen_leaf, rejected_leaf))

        # Pass 2: re-run each microbatch with grad and back-propagate Σ g_i · score_i.
        chosen_offset = rejected_offset = 0
        last = len(microbatches) - 1
        for index, microbatch in enumerate(microbatches):
            sync_context = self.no_sync() if self.no_sync is not None and index < last else contextlib.nullcontext()
            with sync_context:
                with rng_states[index].replay():
                    chosen, rejected = self._scores(microbatch, index, "pass 2")
                for name, tensor, cached in (("chosen", chosen, cached_chosen[index]),
                                             ("rejected", rejected, cached_rejected[index])):
                    if tensor.shape != cached.shape:
                        raise ValueError(f"score_fn: {name} scores of microbatch {index} have shape "
                                         f"{tuple(tensor.shape)} in pass 2 but {tuple(cached.shape)} in pass 1")
                outputs, grads = [], []
                for tensor, grad in ((chosen, grad_chosen[chosen_offset: chosen_offset + chosen.shape[0]]),
                                     (rejected, grad_rejected[rejected_offset: rejected_offset + rejected.shape[0]])):
                    if tensor.requires_grad:
                        outputs.append(tensor)
                        grads.append(grad.to(tensor.dtype))
                if not outputs:
                    raise ValueError(f"score_fn: the scores of microbatch {index} do not require grad in pass 2 "
                                     f"(no trainable parameters, or called under torch.no_grad())")
                torch.autograd.backward(outputs, grads)
            chosen_offset += chosen.shape[0]
            rejected_offset += rejected.shape[0]
        return TwoPassResult(loss=loss.detach(), chosen_scores=chosen_leaf.detach(),
                             rejected_scores=rejected_leaf.detach())
