"""A loss plugin for tests/reliability: rpo, except that building it for unpaired data fails on rank 1 only (the
trainer builds the loss for unpaired data with tau 0.75), as a set-up error raised on one rank."""
import os

from rpo.losses import LossConfigError, build_loss, register_loss


@register_loss("rank1-refuses-unpaired")
def rank1_refuses_unpaired(beta: float = 0.1, tau: float = 0.5):
    if tau == 0.75 and os.environ.get("RANK") == "1":
        raise LossConfigError("this test loss refuses unpaired data on rank 1")
    return build_loss("rpo", beta=beta, tau=tau)
