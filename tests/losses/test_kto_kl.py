"""KTO's reference point z from mismatched pairs: against a float64 formula written here, at 1 rank on the whole
batch and at 2 gloo ranks on its halves (z all-reduced over the group, weighted by each rank's pair count).

Run as a script (`python test_kto_kl.py OUT_DIR`, through tests/multirank.py) this file is the worker of every
rank: it runs each case of SHARDS on its shard and saves z, the loss and the gradients of the trainer's objective
(loss·rows·W/rows_global, W = rpo.distributed.data_parallel_loss_scale) to OUT_DIR/rank<r>.pt.
"""
from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

BETA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT = 0.3, 1.5, 0.7
OPTIONS = dict(beta=BETA, desirable_weight=DESIRABLE_WEIGHT, undesirable_weight=UNDESIRABLE_WEIGHT)
CHOSEN, REJECTED, PAIRS = 5, 4, 7
# Per case, per rank of 2: (chosen rows, rejected rows, mismatched pairs) as [start, stop) of the whole batch.
SHARDS = {
    "uneven": [((0, 2), (0, 3), (0, 2)), ((2, 5), (3, 4), (2, 7))],
    "rank_without_pairs": [((0, 3), (0, 1), (0, 0)), ((3, 5), (1, 4), (0, 7))],
    "negative_kl": [((0, 4), (0, 2), (0, 4)), ((4, 5), (2, 4), (4, 7))],
    "no_pairs": [((0, 2), (0, 2), (0, 0)), ((2, 5), (2, 4), (0, 0))],
}
KL_SHIFT = {"negative_kl": -3.0}  # added to the policy's mismatched log-probs: mean log-ratio < 0, so z = 0


def whole_batch(case: str) -> dict:
    """The fixed float64 batch of one case: unpaired, M = 5 desirable, N = 4 undesirable, K = 7 (or 0) pairs."""
    generator = torch.Generator().manual_seed(12)
    reference = {key: torch.randn(rows, generator=generator, dtype=torch.float64) * 3 - 20
                 for key, rows in (("chosen", CHOSEN), ("rejected", REJECTED), ("kl", PAIRS))}
    # Log-ratios of a few nats, the mismatched ones positive on average.
    policy = {key: values + torch.randn(values.shape[0], generator=generator, dtype=torch.float64) * 2
              + (0.8 if key == "kl" else 0.0) for key, values in reference.items()}
    policy["kl"] = policy["kl"] + KL_SHIFT.get(case, 0.0)
    pairs = 0 if case == "no_pairs" else PAIRS
    return {"policy_chosen_logps": policy["chosen"], "policy_rejected_logps": policy["rejected"],
            "reference_chosen_logps": reference["chosen"], "reference_rejected_logps": reference["rejected"],
            "kl_policy_logps": policy["kl"][:pairs], "kl_reference_logps": reference["kl"][:pairs]}


def shard(batch: dict, case: str, rank: int) -> dict:
    (a, b), (c, d), (e, f) = SHARDS[case][rank]
    out = {}
    for key, value in batch.items():
        start, stop = (a, b) if "chosen" in key else (c, d) if "rejected" in key else (e, f)
        out[key] = value[start:stop].clone()
    return out


# --- float64 formulas (independent of rpo) ------------------------------------------------------------------------

def reference_point(batch: dict) -> float:
    """z = max(0, mean_k(log π_θ(y_k'|x_k) − log π_ref(y_k'|x_k))) over the mismatched pairs; 0 without pairs."""
    log_ratios = batch["kl_policy_logps"] - batch["kl_reference_logps"]
    return max(0.0, log_ratios.mean().item()) if log_ratios.numel() else 0.0


def kto_loss(batch: dict, z: float) -> torch.Tensor:
    """1/(M+N)·[Σ_i λ_D(1 − σ(β(ρ_w,i − z))) + Σ_j λ_U(1 − σ(β(z − ρ_l,j)))], ρ = log π_θ − log π_ref."""
    chosen = batch["policy_chosen_logps"] - batch["reference_chosen_logps"]
    rejected = batch["policy_rejected_logps"] - batch["reference_rejected_logps"]
    desirable = DESIRABLE_WEIGHT * (1 - 1 / (1 + torch.exp(-BETA * (chosen - z))))
    undesirable = UNDESIRABLE_WEIGHT * (1 - 1 / (1 + torch.exp(-BETA * (z - rejected))))
    return (desirable.sum() + undesirable.sum()) / (chosen.numel() + rejected.numel())


def formula_loss_and_grads(batch: dict):
    """(loss, d loss/d policy_chosen_logps, d loss/d policy_rejected_logps) of the float64 formula, z fixed."""
    leaves = {key: batch[key].clone().requires_grad_(True) for key in ("policy_chosen_logps",
                                                                       "policy_rejected_logps")}
    loss = kto_loss({**batch, **leaves}, reference_point(batch))
    loss.backward()
    return loss.detach(), leaves["policy_chosen_logps"].grad, leaves["policy_rejected_logps"].grad


# --- the worker (one process per rank) ----------------------------------------------------------------------------

def run_case(case: str, rank: int, group) -> dict:
    from rpo.distributed import data_parallel_loss_scale
    from rpo.losses import build_loss

    whole = whole_batch(case)
    local = shard(whole, case, rank)
    local["policy_chosen_logps"].requires_grad_(True)
    local["policy_rejected_logps"].requires_grad_(True)
    loss = build_loss("kto", **OPTIONS)
    output = loss(**local, process_group=group)
    loss(**local, process_group=group)  # a second step: the no-pairs warning is given once
    rows = local["policy_chosen_logps"].numel() + local["policy_rejected_logps"].numel()
    objective = output.loss * rows * data_parallel_loss_scale(group) / (CHOSEN + REJECTED)
    objective.backward()
    return {"z": output.metrics["kl"], "pairs": output.metrics["kl_pairs"], "loss": output.loss.detach(),
            "rows": rows, "grad_chosen": local["policy_chosen_logps"].grad,
            "grad_rejected": local["policy_rejected_logps"].grad}


def one_sided_error(rank: int, group) -> str:
    """Rank 0 passes only kl_policy_logps, rank 1 both: every rank must raise (none may wait in a collective)."""
    from rpo.losses import LossInputError, build_loss

    local = shard(whole_batch("uneven"), "uneven", rank)
    if rank == 0:
        del local["kl_reference_logps"]
    try:
        build_loss("kto")(**local, process_group=group)
    except LossInputError as error:
        return str(error)
    return ""


def worker(out_dir: str) -> None:
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.WARNING, format="WARNING %(name)s: %(message)s", stream=sys.stdout)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, group = dist.get_rank(), dist.group.WORLD
    results = {case: run_case(case, rank, group) for case in SHARDS}
    results["one_sided_error"] = one_sided_error(rank, group)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
    sys.exit(0)


# --- the tests (the test process) ---------------------------------------------------------------------------------

import pytest  # noqa: E402

import multirank  # noqa: E402
from rpo.losses import build_loss  # noqa: E402

TOLERANCE = dict(rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("kto_kl")
    result = multirank.launch(Path(__file__), 2, args=[out], timeout=300).check()
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)], result.logs


@pytest.mark.parametrize("case", list(SHARDS))
def test_reference_point_at_one_rank_is_the_formula(case):
    batch = whole_batch(case)
    z = reference_point(batch)
    assert (z > 0) == (case in ("uneven", "rank_without_pairs"))  # the cases cover both sides of the clamp
    leaves = {key: batch[key].clone().requires_grad_(True) for key in ("policy_chosen_logps",
                                                                       "policy_rejected_logps")}
    output = build_loss("kto", **OPTIONS)(**{**batch, **leaves})
    torch.testing.assert_close(output.metrics["kl"].double(), torch.tensor(z, dtype=torch.float64), rtol=1e-6,
                               atol=1e-7)  # metrics are float32
    assert output.metrics["kl_pairs"].item() == batch["kl_policy_logps"].numel()
    output.loss.backward()
    loss, grad_chosen, grad_rejected = formula_loss_and_grads(batch)
    torch.testing.assert_close(output.loss, loss, **TOLERANCE)
    torch.testing.assert_close(leaves["policy_chosen_logps"].grad, grad_chosen, **TOLERANCE)
    torch.testing.assert_close(leaves["policy_rejected_logps"].grad, grad_rejected, **TOLERANCE)


def test_reference_point_moves_the_loss():
    """z enters the loss: the same batch without KL log-probs (z = 0) has another loss."""
    batch = whole_batch("uneven")
    without_kl = {key: value for key, value in batch.items() if not key.startswith("kl_")}
    loss = build_loss("kto", **OPTIONS)
    assert abs(loss(**batch).loss.item() - loss(**without_kl).loss.item()) > 1e-3
    torch.testing.assert_close(loss(**without_kl).loss, kto_loss(batch, 0.0), **TOLERANCE)


@pytest.mark.parametrize("case", list(SHARDS))
def test_two_ranks_equal_one_rank(two_ranks, case):
    """Each rank's z is the whole batch's; the rows-weighted rank losses are the whole batch's loss; each rank's
    objective gradient, averaged over the ranks as DDP does (÷ W), is the whole batch's gradient on its shard."""
    results, _ = two_ranks
    batch = whole_batch(case)
    loss, grad_chosen, grad_rejected = formula_loss_and_grads(batch)
    z = torch.tensor(reference_point(batch), dtype=torch.float32)
    combined = sum(results[rank][case]["loss"] * results[rank][case]["rows"] for rank in range(2)) / (
        CHOSEN + REJECTED)
    torch.testing.assert_close(combined, loss, **TOLERANCE)
    for rank in range(2):
        got = results[rank][case]
        (a, b), (c, d), _ = SHARDS[case][rank]
        torch.testing.assert_close(got["z"], z, rtol=1e-6, atol=1e-7, msg=f"{case}: z on rank {rank}")
        assert got["pairs"].item() == batch["kl_policy_logps"].numel()
        torch.testing.assert_close(got["grad_chosen"] / 2, grad_chosen[a:b], **TOLERANCE)
        torch.testing.assert_close(got["grad_rejected"] / 2, grad_rejected[c:d], **TOLERANCE)
    assert torch.equal(results[0][case]["z"], results[1][case]["z"])  # identical, not just close


def test_no_pairs_in_the_group_warns_once_per_rank(two_ranks):
    _, logs = two_ranks
    for log in logs:
        assert log.count("has no mismatched pairs") == 1, log


def test_one_sided_kl_raises_on_every_rank(two_ranks):
    results, _ = two_ranks
    assert "1 rank(s) of the process group gave only one of kl_policy_logps / kl_reference_logps" in \
        results[0]["one_sided_error"]
    assert results[1]["one_sided_error"] == results[0]["one_sided_error"]


def test_no_pairs_at_one_rank_warns_once(caplog):
    batch = whole_batch("no_pairs")
    loss = build_loss("kto", **OPTIONS)
    with caplog.at_level(logging.WARNING, logger="rpo.losses.separable"):
        outputs = [loss(**batch) for _ in range(3)]
    assert [record.getMessage().count("has no mismatched pairs") for record in caplog.records] == [1]
    assert all(output.metrics["kl"].item() == 0.0 and output.metrics["kl_pairs"].item() == 0 for output in outputs)
    torch.testing.assert_close(outputs[0].loss, kto_loss(batch, 0.0), **TOLERANCE)
