"""Multi-process side of tests/distributed/test_distributed.py: shared case data and the worker run on every rank.

The test process starts the ranks through tests/multirank.py (`python distributed_workers.py OUT_DIR SECTION...`,
CPU, gloo, env://); each rank runs every section on its shard and saves what it got (losses, score gradients,
parameter gradients, metrics, error messages) to OUT_DIR/rank<r>.pt; the test process compares those with its
own dense float64 reference on the concatenated batch. One launch per world size covers all cases, since each
launch costs seconds of imports.
"""
from __future__ import annotations

import datetime
import functools
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

EMBEDDING_DIM = 6
FEATURE_DIM = 5
BETA = 0.7

# Shards (M_r, N_r) per rank of the global batch, for each world size; the concatenation in rank order is the
# single-process batch. "paired*" splits have Σ M_r = Σ N_r (chosen i and rejected i share a prompt).
SPLITS = {
    "paired_even": {2: [(4, 4), (3, 3)], 3: [(3, 3), (2, 2), (2, 2)]},
    "paired_empty_rank": {2: [(0, 0), (7, 7)], 3: [(3, 3), (0, 0), (4, 4)]},
    "paired_uneven": {2: [(5, 2), (2, 5)], 3: [(1, 3), (6, 0), (0, 4)]},
    "unpaired": {2: [(2, 4), (4, 1)], 3: [(3, 0), (0, 2), (3, 3)]},
    "unpaired_empty_rank": {2: [(6, 5), (0, 0)], 3: [(2, 2), (4, 3), (0, 0)]},
}
WEIGHTINGS = ("embedding", "uniform", "none", "diagonal")
NORMALIZATIONS = ("row", "mean")


def loss_cases():
    """Every (split, weighting, normalisation) the global loss is checked on; diagonal only on square batches."""
    cases = []
    for (split, weighting, normalization) in itertools.product(SPLITS, WEIGHTINGS, NORMALIZATIONS):
        paired = split.startswith("paired")
        if weighting == "diagonal" and not paired:
            continue
        cases.append(dict(name=f"{split}-{weighting}-{normalization}", split=split, weighting=weighting,
                          weight_normalization=normalization, tau=0.5 if paired else 0.75, alpha=0.6,
                          margin=0.3 if normalization == "mean" else 0.0, beta=BETA))
    return cases


def global_batch(split: str, seed: int = 0):
    """Scores a [M], b [N] and prompt embeddings e [M, D], f [N, D] of the whole batch, float64."""
    sizes = SPLITS[split][2]
    rows, columns = sum(m for m, _ in sizes), sum(n for _, n in sizes)
    generator = torch.Generator().manual_seed(1000 + seed + sum(map(ord, split)))
    chosen = torch.randn(rows, generator=generator, dtype=torch.float64) * 2
    rejected = torch.randn(columns, generator=generator, dtype=torch.float64) * 2
    chosen_embeddings = torch.randn(rows, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    if split.startswith("paired"):  # same prompt for chosen i and rejected i
        rejected_embeddings = chosen_embeddings.clone()
    else:
        rejected_embeddings = torch.randn(columns, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    return chosen, rejected, chosen_embeddings, rejected_embeddings


def shard_slices(sizes, rank):
    row_start = sum(m for m, _ in sizes[:rank])
    column_start = sum(n for _, n in sizes[:rank])
    m, n = sizes[rank]
    return slice(row_start, row_start + m), slice(column_start, column_start + n)


# ---- tiny scoring model for the two-pass and DDP checks -------------------------------------------------------
# Rank r holds microbatches of (chosen, rejected) feature rows; TWO_PASS_SHARDS[r][k] = (M, N) of microbatch k.
# Global order: rank 0's microbatches in order, then rank 1's (what TwoPassContrast concatenates per rank).
TWO_PASS_SHARDS = [[(2, 3), (1, 0)], [(0, 2), (3, 1)]]


class ScoreModel(torch.nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURE_DIM, 4)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, features):
        return self.head(self.dropout(torch.tanh(self.hidden(features)))).squeeze(-1)


def make_model(dropout: float = 0.0) -> ScoreModel:
    torch.manual_seed(7)
    return ScoreModel(dropout).double()


def model_batch():
    """Per rank, per microbatch: dict of chosen/rejected features and prompt embeddings (float64)."""
    generator = torch.Generator().manual_seed(99)
    shards = []
    for rank_sizes in TWO_PASS_SHARDS:
        microbatches = []
        for m, n in rank_sizes:
            microbatches.append(dict(
                chosen=torch.randn(m, FEATURE_DIM, generator=generator, dtype=torch.float64),
                rejected=torch.randn(n, FEATURE_DIM, generator=generator, dtype=torch.float64),
                chosen_embeddings=torch.randn(m, EMBEDDING_DIM, generator=generator, dtype=torch.float64),
                rejected_embeddings=torch.randn(n, EMBEDDING_DIM, generator=generator, dtype=torch.float64)))
        shards.append(microbatches)
    return shards


MODEL_LOSS_OPTIONS = dict(beta=BETA, weighting="embedding", tau=0.75, weight_normalization="row", margin=0.1)


def model_scores(model, microbatch):
    return model(microbatch["chosen"]), model(microbatch["rejected"])


def model_embeddings(microbatch):
    return microbatch["chosen_embeddings"], microbatch["rejected_embeddings"]


def parameter_grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# ---- normalisations: the same global matrix at any layout, the effective β at any size ------------------------
LAYOUT_PAIRS = 8  # 1 rank × 8 pairs, 2 ranks × 4 pairs, 1 rank × 2 micro-batches × 4 pairs
# (name, rpo options): each normalisation, and the authors' diagonal form (whose diagonal part is separable).
LAYOUT_LOSSES = {
    "row": dict(weighting="embedding", weight_normalization="row"),
    "mean": dict(weighting="embedding", weight_normalization="mean"),
    "reference_columns": dict(weighting="embedding", weight_normalization="reference_columns",
                              normalization_columns=4),
    "authors_diagonal": dict(weighting="diagonal", form="authors", alpha=0.6),
}
LAYOUT_LOSS_OPTIONS = dict(beta=BETA, tau=0.75, margin=0.1)


def layout_batch(first=0, count=LAYOUT_PAIRS):
    """Pairs first .. first + count - 1 of the layout batch: features, prompt embeddings, reference log-probs."""
    generator = torch.Generator().manual_seed(5)
    pairs = dict(chosen=torch.randn(LAYOUT_PAIRS, FEATURE_DIM, generator=generator, dtype=torch.float64),
                 rejected=torch.randn(LAYOUT_PAIRS, FEATURE_DIM, generator=generator, dtype=torch.float64),
                 chosen_embeddings=torch.randn(LAYOUT_PAIRS, EMBEDDING_DIM, generator=generator, dtype=torch.float64),
                 reference_chosen=torch.randn(LAYOUT_PAIRS, generator=generator, dtype=torch.float64),
                 reference_rejected=torch.randn(LAYOUT_PAIRS, generator=generator, dtype=torch.float64))
    pairs["rejected_embeddings"] = pairs["chosen_embeddings"]  # paired: the same prompt
    return {key: value[first:first + count] for key, value in pairs.items()}


def layout_loss_inputs(pairs, chosen_scores, rejected_scores):
    """The built loss's keywords for `pairs` with the model's scores as policy log-probs."""
    return dict(policy_chosen_logps=chosen_scores, policy_rejected_logps=rejected_scores,
                reference_chosen_logps=pairs["reference_chosen"], reference_rejected_logps=pairs["reference_rejected"],
                chosen_embeddings=pairs["chosen_embeddings"], rejected_embeddings=pairs["rejected_embeddings"])


def effective_beta_batch(rank, columns):
    generator = torch.Generator().manual_seed(100 * columns + rank)
    scores = torch.randn(4, columns, generator=generator, dtype=torch.float64)
    embeddings = torch.randn(columns, EMBEDDING_DIM, generator=generator, dtype=torch.float64)
    return dict(policy_chosen_logps=scores[0], policy_rejected_logps=scores[1], reference_chosen_logps=scores[2],
                reference_rejected_logps=scores[3], chosen_embeddings=embeddings, rejected_embeddings=embeddings)


def _run_normalizations(rank, world_size, group, results):
    """Each rank holds LAYOUT_PAIRS / W pairs of the layout batch; and contrast/effective_beta of global
    matrices of W·4 and W·32 columns."""
    from rpo.losses import build_loss

    per_rank = LAYOUT_PAIRS // world_size
    pairs = layout_batch(rank * per_rank, per_rank)
    for name, options in LAYOUT_LOSSES.items():
        loss = build_loss("rpo", global_contrast=True, **LAYOUT_LOSS_OPTIONS, **options)
        model = make_model()
        output = loss(**layout_loss_inputs(pairs, model(pairs["chosen"]), model(pairs["rejected"])),
                      process_group=group)
        # The trainer's objective without a DP wrapper (W = 1): the global part, plus the separable part weighted
        # by this rank's share of the rows; the ranks' gradients then add up to the global batch's.
        separable = output.loss - output.global_loss
        (output.global_loss + separable * per_rank / LAYOUT_PAIRS).backward()
        results[f"layout:{name}"] = dict(loss=output.loss.detach(), global_loss=output.global_loss.detach(),
                                         grads=parameter_grads(model))
    for columns in (4, 32):
        batch = effective_beta_batch(rank, columns)
        for name, options in LAYOUT_LOSSES.items():
            output = build_loss("rpo", global_contrast=True, **LAYOUT_LOSS_OPTIONS, **options)(
                **batch, process_group=group)
            results[f"effective_beta:{name}:{columns * world_size}"] = output.metrics["contrast/effective_beta"]


# ---- worker sections -------------------------------------------------------------------------------------------
def _global_contrast_case(chosen, rejected, chosen_embeddings, rejected_embeddings, group, options):
    from rpo.distributed import global_contrast_loss

    return global_contrast_loss(chosen, rejected, chosen_embeddings=chosen_embeddings,
                                rejected_embeddings=rejected_embeddings, process_group=group, **options), {}


def _built_loss_case(chosen, rejected, chosen_embeddings, rejected_embeddings, group, options):
    """build_loss("rpo", global_contrast=True) with the scores as log-ratios (reference log-probs 0); α is an
    option of the diagonal weighting only."""
    from rpo.losses import build_loss

    if options["weighting"] != "diagonal":
        options = {key: value for key, value in options.items() if key != "alpha"}
    output = build_loss("rpo", global_contrast=True, **options)(
        policy_chosen_logps=chosen, policy_rejected_logps=rejected, reference_chosen_logps=torch.zeros_like(chosen),
        reference_rejected_logps=torch.zeros_like(rejected), chosen_embeddings=chosen_embeddings,
        rejected_embeddings=rejected_embeddings, process_group=group)
    return output.loss, dict(metrics=output.metrics, global_loss_is_loss=output.global_loss is output.loss)


def _run_loss_cases(rank, world_size, group, results, evaluate, prefix):
    """Every loss case through evaluate(local scores and embeddings, group, options) -> (loss, extra results)."""
    for case in loss_cases():
        sizes = SPLITS[case["split"]][world_size]
        rows, columns = shard_slices(sizes, rank)
        chosen, rejected, chosen_embeddings, rejected_embeddings = global_batch(case["split"])
        local_chosen = chosen[rows].clone().requires_grad_(True)
        local_rejected = rejected[columns].clone().requires_grad_(True)
        options = {k: case[k] for k in ("beta", "weighting", "weight_normalization", "tau", "alpha", "margin")}
        loss, extra = evaluate(local_chosen, local_rejected, chosen_embeddings[rows], rejected_embeddings[columns],
                               group, options)
        connected = loss.requires_grad and loss.grad_fn is not None
        loss.backward()
        results[prefix + case["name"]] = dict(loss=loss.detach(), grad_chosen=local_chosen.grad.clone(),
                                              grad_rejected=local_rejected.grad.clone(), connected=connected, **extra)


def _run_special_cases(rank, world_size, group, results):
    """No-grad ranks, bfloat16, and errors every rank must raise together."""
    from rpo.distributed import global_contrast_loss

    split = "unpaired"
    sizes = SPLITS[split][world_size]
    rows, columns = shard_slices(sizes, rank)
    chosen, rejected, chosen_embeddings, rejected_embeddings = global_batch(split)
    options = dict(beta=BETA, weighting="embedding", weight_normalization="row", tau=0.75, margin=0.0)

    # Rank 0 evaluates without grad while the others train: the collectives must still match.
    local_chosen = chosen[rows].clone().requires_grad_(rank != 0)
    local_rejected = rejected[columns].clone().requires_grad_(rank != 0)
    with torch.set_grad_enabled(rank != 0):
        loss = global_contrast_loss(local_chosen, local_rejected, chosen_embeddings=chosen_embeddings[rows],
                                    rejected_embeddings=rejected_embeddings[columns], process_group=group, **options)
    entry = dict(loss=loss.detach(), requires_grad=loss.requires_grad)
    if rank != 0:
        loss.backward()
        entry.update(grad_chosen=local_chosen.grad.clone(), grad_rejected=local_rejected.grad.clone())
    results["rank0_no_grad"] = entry

    # bfloat16 scores (computed in float32 by the op, gradients returned in bfloat16).
    local_chosen = chosen[rows].to(torch.bfloat16).requires_grad_(True)
    local_rejected = rejected[columns].to(torch.bfloat16).requires_grad_(True)
    loss = global_contrast_loss(local_chosen, local_rejected, chosen_embeddings=chosen_embeddings[rows].float(),
                                rejected_embeddings=rejected_embeddings[columns].float(), process_group=group,
                                **options)
    loss.backward()
    results["bfloat16"] = dict(loss=loss.detach(), grad_chosen=local_chosen.grad.clone(),
                               grad_rejected=local_rejected.grad.clone())
    # The same (bfloat16-valued) scores in float32: the bfloat16 results must be these, rounded once.
    float_chosen = local_chosen.detach().float().requires_grad_(True)
    float_rejected = local_rejected.detach().float().requires_grad_(True)
    loss = global_contrast_loss(float_chosen, float_rejected, chosen_embeddings=chosen_embeddings[rows].float(),
                                rejected_embeddings=rejected_embeddings[columns].float(), process_group=group,
                                **options)
    loss.backward()
    results["bfloat16_as_float32"] = dict(loss=loss.detach(), grad_chosen=float_chosen.grad.clone(),
                                          grad_rejected=float_rejected.grad.clone())

    # Errors: a non-square global batch with "diagonal"; embedding widths that differ between ranks.
    errors = {}
    non_square = [(3, 2)] + [(1, 1)] * (world_size - 1)
    m, n = non_square[rank]
    try:
        global_contrast_loss(torch.zeros(m, dtype=torch.float64, requires_grad=True),
                             torch.zeros(n, dtype=torch.float64, requires_grad=True), beta=BETA,
                             weighting="diagonal", process_group=group)
        errors["diagonal_non_square"] = None
    except ValueError as error:
        errors["diagonal_non_square"] = str(error)
    width = EMBEDDING_DIM + (1 if rank == world_size - 1 else 0)
    try:
        global_contrast_loss(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), beta=BETA,
                             chosen_embeddings=torch.ones(2, width, dtype=torch.float64),
                             rejected_embeddings=torch.ones(2, width, dtype=torch.float64), process_group=group)
        errors["embedding_width_mismatch"] = None
    except ValueError as error:
        errors["embedding_width_mismatch"] = str(error)
    # A NaN score on the last rank only: that rank names it, the others say which rank failed; nobody hangs.
    scores = torch.zeros(2, dtype=torch.float64)
    if rank == world_size - 1:
        scores[1] = float("nan")
    try:
        global_contrast_loss(scores, torch.zeros(2, dtype=torch.float64), beta=BETA, weighting="uniform",
                             process_group=group)
        errors["nan_on_last_rank"] = None
    except ValueError as error:
        errors["nan_on_last_rank"] = str(error)
    # The authors' diagonal form needs each rank's answers in pairs; a square global matrix with unequal shards
    # passes the loss's collectives, then every rank raises (from the same table of shard sizes).
    from rpo.losses import LossInputError, build_loss

    m, n = SPLITS["paired_uneven"][world_size][rank]
    scores = torch.zeros(m + n, dtype=torch.float64)
    try:
        build_loss("rpo", weighting="diagonal", form="authors", global_contrast=True)(
            policy_chosen_logps=scores[:m], policy_rejected_logps=scores[m:], reference_chosen_logps=scores[:m],
            reference_rejected_logps=scores[m:], process_group=group)
        errors["authors_diagonal_unpaired_shards"] = None
    except LossInputError as error:
        errors["authors_diagonal_unpaired_shards"] = str(error)
    results["errors"] = errors
    # The group is still in step after the errors.
    local_chosen = chosen[rows].clone().requires_grad_(True)
    local_rejected = rejected[columns].clone().requires_grad_(True)
    loss = global_contrast_loss(local_chosen, local_rejected, chosen_embeddings=chosen_embeddings[rows],
                                rejected_embeddings=rejected_embeddings[columns], process_group=group, **options)
    loss.backward()
    results["after_errors"] = dict(loss=loss.detach(), grad_chosen=local_chosen.grad.clone(),
                                   grad_rejected=local_rejected.grad.clone())


def _run_subgroups(rank, world_size, results):
    """Data-parallel group smaller than the world (as with tensor parallelism): {0} and {1, 2}."""
    from rpo.distributed import global_contrast_loss

    solo, pair = dist.new_group([0]), dist.new_group([1, 2])  # every rank must create every group
    group, group_sizes = (solo, [(4, 3)]) if rank == 0 else (pair, [(1, 2), (3, 1)])
    group_rank = dist.get_rank(group)
    rows, columns = shard_slices(group_sizes, group_rank)
    chosen, rejected, chosen_embeddings, rejected_embeddings = global_batch("unpaired", seed=int(rank == 0))
    local_chosen = chosen[:4][rows].clone().requires_grad_(True)
    local_rejected = rejected[:3][columns].clone().requires_grad_(True)
    loss = global_contrast_loss(local_chosen, local_rejected, beta=BETA, tau=0.75, process_group=group,
                                chosen_embeddings=chosen_embeddings[:4][rows],
                                rejected_embeddings=rejected_embeddings[:3][columns])
    loss.backward()
    results["subgroup"] = dict(loss=loss.detach(), grad_chosen=local_chosen.grad.clone(),
                               grad_rejected=local_rejected.grad.clone(), group_sizes=group_sizes,
                               group_rank=group_rank, seed=int(rank == 0))


def _run_model_sections(rank, world_size, group, results):
    """Two-pass over 2 microbatches (plain and under DDP) and single-pass DDP, on the tiny ScoreModel."""
    from torch.nn.parallel import DistributedDataParallel

    from rpo.distributed import TwoPassContrast, data_parallel_loss_scale, global_contrast_loss

    microbatches = model_batch()[rank]
    loss_fn = functools.partial(global_contrast_loss, process_group=group, **MODEL_LOSS_OPTIONS)

    # Two-pass without a DP wrapper: per-rank gradients, whose sum over ranks is the full gradient.
    model = make_model()
    two_pass = TwoPassContrast(functools.partial(model_scores, model), loss_fn, embedding_fn=model_embeddings)
    step = two_pass.step(microbatches)
    results["two_pass"] = dict(loss=step.loss, grads=parameter_grads(model), chosen_scores=step.chosen_scores,
                               rejected_scores=step.rejected_scores)

    # Two-pass under DDP (averaging): loss scaled by W, gradients all-reduced once (no_sync on microbatch 0).
    ddp_model = DistributedDataParallel(make_model(), process_group=group)
    two_pass = TwoPassContrast(functools.partial(model_scores, ddp_model), loss_fn, embedding_fn=model_embeddings,
                               loss_scale=data_parallel_loss_scale(group), no_sync=ddp_model.no_sync)
    step = two_pass.step(microbatches)
    results["two_pass_ddp"] = dict(loss=step.loss, grads=parameter_grads(ddp_model.module))

    # The same with kept graphs: the first microbatch only (the second re-run), and both (no second forward).
    for keep in (1, 2):
        ddp_model = DistributedDataParallel(make_model(), process_group=group)
        two_pass = TwoPassContrast(functools.partial(model_scores, ddp_model), loss_fn, embedding_fn=model_embeddings,
                                   loss_scale=data_parallel_loss_scale(group), no_sync=ddp_model.no_sync,
                                   keep_graphs=keep)
        step = two_pass.step(microbatches)
        results[f"two_pass_ddp_keep{keep}"] = dict(loss=step.loss, grads=parameter_grads(ddp_model.module),
                                                   kept=step.kept)

    # Single pass under DDP: the whole local shard in one forward, --global-contrast semantics.
    ddp_model = DistributedDataParallel(make_model(), process_group=group)
    chosen = torch.cat([mb["chosen"] for mb in microbatches])
    rejected = torch.cat([mb["rejected"] for mb in microbatches])
    loss = loss_fn(ddp_model(chosen), ddp_model(rejected),
                   chosen_embeddings=torch.cat([mb["chosen_embeddings"] for mb in microbatches]),
                   rejected_embeddings=torch.cat([mb["rejected_embeddings"] for mb in microbatches]))
    (loss * data_parallel_loss_scale(group)).backward()
    results["ddp"] = dict(loss=loss.detach(), grads=parameter_grads(ddp_model.module))


def main(out_dir: str, sections) -> None:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    runners = {
        "loss_cases": lambda results: _run_loss_cases(rank, world_size, group, results, _global_contrast_case, ""),
        "special_cases": lambda results: _run_special_cases(rank, world_size, group, results),
        "subgroups": lambda results: _run_subgroups(rank, world_size, results),
        "model": lambda results: _run_model_sections(rank, world_size, group, results),
        "normalizations": lambda results: _run_normalizations(rank, world_size, group, results),
        # The same cases through the built loss (build_loss("rpo", global_contrast=True)), the API the trainer
        # calls: run last, so that a failure there (which ends the launch) leaves the other sections' results.
        "built_loss": lambda results: _run_loss_cases(rank, world_size, group, results, _built_loss_case, "built:"),
    }
    results = {}
    try:
        for section in sections:
            runners[section](results)
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))  # saved per section, see built_loss
    finally:
        dist.destroy_process_group()


class Launch:
    """The per-rank results of one launch, and the error that ended it early (None if it completed)."""

    def __init__(self, ranks, error):
        self.ranks, self.error = ranks, error

    def case(self, name):
        """[rank 0's result, rank 1's, ...] for `name`; fails the test with the launch's error if it is missing."""
        missing = [rank for rank, results in enumerate(self.ranks) if name not in results]
        if missing:
            raise AssertionError(f"no result for {name!r} on rank(s) {missing}: the launch failed first:\n{self.error}")
        return [results[name] for results in self.ranks]

    def __len__(self):
        return len(self.ranks)


def launch(world_size: int, out_dir: str, sections) -> Launch:
    """Start `world_size` gloo ranks running `sections` in order (tests/multirank.py); collect what each saved."""
    import multirank

    result = multirank.launch(Path(__file__), world_size, args=[out_dir, *sections], log_dir=out_dir)
    error = None if result.returncode == 0 and not result.timed_out else result.report()
    ranks = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.pt")
        ranks.append(torch.load(path) if os.path.exists(path) else {})
    return Launch(ranks, error)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
