"""Global contrast over data-parallel ranks (`global_contrast`) and gradient-accumulation micro-batches
(`two_pass`), built on the local op `rpo.ops`. See docs/global-contrast.md.
"""
from rpo.distributed.global_contrast import (GlobalColumns, data_parallel_loss_scale, global_contrast_loss,
                                             global_contrast_loss_and_columns)
from rpo.distributed.two_pass import TwoPassContrast, TwoPassResult

__all__ = ["GlobalColumns", "TwoPassContrast", "TwoPassResult", "data_parallel_loss_scale", "global_contrast_loss",
           "global_contrast_loss_and_columns"]
