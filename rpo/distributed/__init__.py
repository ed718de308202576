"""Global contrast over data-parallel ranks and gradient-accumulation microbatches (see README.md (section "Global contrast"))."""
from rpo.distributed.contrast import data_parallel_loss_scale, global_contrast_loss
from rpo.distributed.two_pass import TwoPassContrast, TwoPassResult

__all__ = ["TwoPassContrast", "TwoPassResult", "data_parallel_loss_scale", "global_contrast_loss"]
