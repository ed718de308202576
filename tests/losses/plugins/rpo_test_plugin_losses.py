"""Test fixture: a user's loss module outside the library.

tests/losses/test_losses.py imports it by module path ("rpo_test_plugin_losses:...", with tests/losses/plugins
on sys.path) and by file path ("tests/losses/plugins/rpo_test_plugin_losses.py:..."). It uses only rpo's public API.
"""
import torch

from rpo.losses import LossOutput, register_loss


@register_loss("test-hinge-dpo")
def hinge_dpo(beta: float = 0.1, margin: float = 1.0):
    """mean_i max(0, margin − β·h_i) with h_i the DPO log-ratio difference."""

    def loss(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        logits = beta * ((policy_chosen_logps - reference_chosen_logps)
                         - (policy_rejected_logps - reference_rejected_logps))
        return LossOutput(torch.relu(margin - logits).mean(), {"hinge/active": (logits < margin).float().mean()})

    return loss


@register_loss("test-chosen-nll")
class ChosenNLL:
    """−scale·mean_i log π(y_w,i); chosen_lengths is optional (only to show signature inference)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, *, policy_chosen_logps, chosen_lengths=None):
        return LossOutput(-self.scale * policy_chosen_logps.mean(), {"nll/constant": 1.5})


def unregistered_margin_loss(weight: float = 1.0):
    """A factory that is NOT registered: reachable only as 'rpo_test_plugin_losses:unregistered_margin_loss'."""

    def loss(*, policy_chosen_logps, policy_rejected_logps):
        return LossOutput(weight * (policy_rejected_logps.mean() - policy_chosen_logps.mean()), {})

    return loss
