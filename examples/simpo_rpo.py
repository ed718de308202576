"""SimPO + RPO (the paper's Appendix B) as a user-side loss plugin, written with rpo's public API only.

SimPO's reference-free, length-normalised scores go into RPO's contrast matrix:
    a_i = log π(y_w,i|x_i) / |y_w,i|,   b_j = log π(y_l,j|x_j) / |y_l,j|,
    L = −1/(M·N) Σ_ij log σ(ω_ij·(β(a_i − b_j) − γ)).

Use it without editing the library (the file registers exactly one loss, so the path alone names it):
    python examples/train.py --loss examples/simpo_rpo.py ...
    build_loss("examples/simpo_rpo.py", beta=2.0, weighting="uniform")
rpo also ships this loss built in as "simpo-rpo"; this plugin registers "my-simpo-rpo" so both coexist.
Run it to compare the two on a random batch:  python examples/simpo_rpo.py
"""
from typing import Literal

from rpo.losses import LossOutput, register_loss, reward_metrics
from rpo.ops import contrast_loss


@register_loss("my-simpo-rpo")
def simpo_rpo(beta: float = 2.0, margin: float = 0.5,
              weighting: Literal["embedding", "uniform", "none"] = "embedding", tau: float = 0.5):
    # build_loss has already checked the option names and that weighting is one of the Literal's values.
    if beta <= 0 or tau <= 0:
        raise ValueError(f"my-simpo-rpo: beta and tau must be > 0, got beta={beta}, tau={tau}")
    use_embeddings = weighting == "embedding"

    def loss(*, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
             chosen_embeddings=None, rejected_embeddings=None):
        chosen = policy_chosen_logps / chosen_lengths  # mean log-prob per token
        rejected = policy_rejected_logps / rejected_lengths
        value = contrast_loss(chosen, rejected, beta=beta, margin=margin, weighting=weighting, tau=tau,
                              chosen_embeddings=chosen_embeddings if use_embeddings else None,
                              rejected_embeddings=rejected_embeddings if use_embeddings else None)
        metrics = reward_metrics(beta * chosen, beta * rejected, policy_chosen_logps, policy_rejected_logps)
        return LossOutput(value, metrics)

    # Without this attribute the required batch keywords are read from the signature (parameters without a
    # default); the embeddings are needed only for the embedding weighting.
    loss.requires = {"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"} | (
        {"chosen_embeddings", "rejected_embeddings"} if use_embeddings else set())
    return loss


if __name__ == "__main__":
    import torch

    from rpo.losses import build_loss

    generator = torch.Generator().manual_seed(0)
    rows, width = 6, 16
    batch = dict(
        policy_chosen_logps=-torch.rand(rows, generator=generator, dtype=torch.float64) * 40,
        policy_rejected_logps=-torch.rand(rows, generator=generator, dtype=torch.float64) * 40,
        chosen_lengths=torch.randint(5, 30, (rows,), generator=generator),
        rejected_lengths=torch.randint(5, 30, (rows,), generator=generator),
        chosen_embeddings=torch.randn(rows, width, generator=generator, dtype=torch.float64),
    )
    batch["rejected_embeddings"] = batch["chosen_embeddings"]  # paired data: row i of both has the same prompt
    for name in ("my-simpo-rpo", "simpo-rpo"):
        output = build_loss(name)(**batch)
        shown = ", ".join(f"{key}={value.item():.4f}" for key, value in output.metrics.items())
        print(f"{name:>13}: loss={output.loss.item():.6f}  {shown}")
