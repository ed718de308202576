"""Cached-score contrast across gradient-accumulation microbatches (GradCache-style), with kept graphs.

The contrast loss couples every chosen answer with every rejected answer of the step, so it cannot be split into
independent per-microbatch losses. But the rewards are one scalar per sequence, so the loss needs only the
scores: the model's work can be split around them.

  pass 1: run `score_fn` on every microbatch and cache its scores. The first `keep_graphs` microbatches run with
          grad and keep their autograd graph until their backward; the others run without grad (no activations
          kept);
  loss:   build the contrast matrix of the whole step (global over the DP group when `loss_fn` is global) on
          leaf copies of the cached scores and get g = dL/dscore for every sequence;
  pass 2: back-propagate Σ_i g_i · score_i through each microbatch, in order: through its kept graph, or by
          re-running `score_fn` on it with grad. Either puts exactly dL/dθ (through that microbatch's sequences)
          into the parameters' .grad.

Cost and memory: a kept microbatch costs what it costs in a step without the contrast (one forward and one
backward), and its activations live from its forward to its backward; a re-run one costs one extra forward, and
its activations live through its own pass-2 forward and backward only. Keeping k graphs of A holds k microbatches'
activations at once (k = 1 holds what any accumulated step holds); under full activation recomputation a graph is
only each layer's input. The trainer chooses k from the memory plan (rpo.train.scale.kept_graph_count). The cache
is 2 scalars per sequence.

Pass 2 replays the RNG state each re-run microbatch had in pass 1 (the default generators, and the named states of
any `rng_state_trackers`, such as megatron's model-parallel RNG tracker that its attention dropout draws from), so
dropout masks agree; the forward must otherwise be deterministic. Kept graphs need no replay.
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
    kept: Tuple[bool, ...] = ()    # per microbatch: its pass-1 graph was kept (True) or it was re-run (False)


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
        (differentiable w.r.t. the model; called once with grad for a microbatch whose graph is kept, twice for
        one that is re-run: without grad in pass 1, with grad in pass 2).
    loss_fn(chosen_scores, rejected_scores, **embeddings) -> scalar: the contrast loss of the whole step, e.g.
        functools.partial(rpo.distributed.global_contrast_loss, beta=0.1, process_group=dp_group) for a global
        matrix over the data-parallel group, or functools.partial(rpo.ops.contrast_loss, beta=0.1) for one rank.
    embedding_fn(microbatch) -> (chosen_embeddings [M_k, D], rejected_embeddings [N_k, D]), optional: the prompt
        embeddings for "embedding" weighting; passed to loss_fn as chosen_embeddings=, rejected_embeddings=.
    loss_scale: multiplies the loss before backward; under a DP wrapper that averages gradients pass
        rpo.distributed.data_parallel_loss_scale(dp_group) (= W) so .grad is the gradient of the global loss.
    no_sync: the DP wrapper's `no_sync` (e.g. ddp_model.no_sync); every microbatch but the last runs pass 2
        (and a kept one its pass-1 forward) inside it, so gradients are all-reduced once per step. Such a wrapper
        decides at forward time whether a backward reduces, so with it the last of several microbatches is
        always re-run. (megatron's DDP reduces in finalize_model_grads and needs no no_sync.)
    rng_state_trackers: objects with get_states() -> dict and set_states(dict) whose named RNG states the forward
        also draws from (megatron.core.tensor_parallel.get_cuda_rng_tracker()); replayed in pass 2 like the
        default generators.
    keep_graphs: how many microbatches (the first ones of each step) keep their pass-1 graph for the backward
        instead of being re-run in pass 2 (0: every microbatch is re-run; ≥ the number of microbatches: none is,
        one forward per microbatch). The result is the same either way; the choice trades memory for time.

    step(microbatches) accumulates into .grad (zero it before, call optimizer.step() after) and returns a
    TwoPassResult. In a DP group every rank must call step with the same number of microbatches (a microbatch may
    hold 0 answers of either kind).
    """

    def __init__(self, score_fn: ScoreFn, loss_fn: Callable[..., torch.Tensor], *,
                 embedding_fn: Optional[EmbeddingFn] = None, loss_scale: float = 1.0,
                 no_sync: Optional[Callable[[], ContextManager]] = None, rng_state_trackers: Sequence[Any] = (),
                 keep_graphs: int = 0):
        if isinstance(keep_graphs, bool) or not isinstance(keep_graphs, int) or keep_graphs < 0:
            raise ValueError(f"keep_graphs must be an integer ≥ 0, got {keep_graphs!r}")
        self.keep_graphs = keep_graphs
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
        last = len(microbatches) - 1
        # A DP wrapper with no_sync (torch DDP) decides at forward time whether the backward reduces: a kept
        # graph is made inside no_sync, and the last microbatch, whose backward reduces, is re-run.
        kept = tuple(index < self.keep_graphs and (self.no_sync is None or index < last or last == 0)
                     for index in range(len(microbatches)))
        # Pass 1: the scores; with grad (graph kept) for the first keep_graphs microbatches, without for the rest.
        cached_chosen, cached_rejected, graphs, rng_states = [], [], [], []
        for index, microbatch in enumerate(microbatches):
            if kept[index]:
                sync_context = self.no_sync() if self.no_sync is not None and index < last else contextlib.nullcontext()
                with torch.enable_grad(), sync_context:
                    scores = self._scores(microbatch, index, "pass 1")
                self._check_differentiable(scores, index, "pass 1")
                graphs.append(scores)
                rng_states.append(None)
            else:
                rng_states.append(_ReplayableRng(self.rng_state_trackers))
                with torch.no_grad():
                    scores = self._scores(microbatch, index, "pass 1")
                graphs.append(None)
            cached_chosen.append(scores[0].detach())
            cached_rejected.append(scores[1].detach())

        # The step's loss on leaf copies of the cached scores: dL/dscore for every sequence.
        chosen_leaf = torch.cat(cached_chosen).requires_grad_(True)
        rejected_leaf = torch.cat(cached_rejected).requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(chosen_leaf, rejected_leaf, **self._embedding_kwargs(microbatches))
            grad_chosen, grad_rejected = torch.autograd.grad(loss * self.loss_scale, (chosen_leaf, rejected_leaf))

        # Pass 2: back-propagate Σ g_i · score_i through each microbatch, in order (kept graph or a re-run).
        chosen_offset = rejected_offset = 0
        for index, microbatch in enumerate(microbatches):
            sync_context = self.no_sync() if self.no_sync is not None and index < last else contextlib.nullcontext()
            with sync_context:
                if kept[index]:
                    chosen, rejected = graphs[index]
                    graphs[index] = None  # the graph is freed by its backward
                else:
                    with rng_states[index].replay():
                        chosen, rejected = self._scores(microbatch, index, "pass 2")
                    for name, tensor, cached in (("chosen", chosen, cached_chosen[index]),
                                                 ("rejected", rejected, cached_rejected[index])):
                        if tensor.shape != cached.shape:
                            raise ValueError(f"score_fn: {name} scores of microbatch {index} have shape "
                                             f"{tuple(tensor.shape)} in pass 2 but {tuple(cached.shape)} in pass 1")
                    self._check_differentiable((chosen, rejected), index, "pass 2")
                outputs, grads = [], []
                for tensor, grad in ((chosen, grad_chosen[chosen_offset: chosen_offset + chosen.shape[0]]),
                                     (rejected, grad_rejected[rejected_offset: rejected_offset + rejected.shape[0]])):
                    if tensor.requires_grad:
                        outputs.append(tensor)
                        grads.append(grad.to(tensor.dtype))
                torch.autograd.backward(outputs, grads)
            chosen_offset += chosen.shape[0]
            rejected_offset += rejected.shape[0]
            del chosen, rejected, outputs
        return TwoPassResult(loss=loss.detach(), chosen_scores=chosen_leaf.detach(),
                             rejected_scores=rejected_leaf.detach(), kept=kept)

    @staticmethod
    def _check_differentiable(scores, index: int, pass_name: str) -> None:
        if not any(tensor.requires_grad for tensor in scores):
            raise ValueError(f"score_fn: the scores of microbatch {index} do not require grad in {pass_name} "
                             f"(no trainable parameters, or called under torch.no_grad())")
