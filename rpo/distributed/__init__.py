"""Global contrast over data-parallel ranks (`global_contrast`) and gradient-accumulation micro-batches
(`two_pass`), built on the local op `rpo.ops`, and the data-parallel objective every trainer back-propagates
(`objective`). See docs/global-contrast.md.
"""
from rpo.distributed.global_contrast import GlobalColumns, global_contrast_loss, global_contrast_loss_and_columns
from rpo.distributed.objective import data_parallel_loss_scale, data_parallel_objective
from rpo.distributed.two_pass import TwoPassContrast, TwoPassResult

__all__ = ["GlobalColumns", "TwoPassContrast", "TwoPassResult", "data_parallel_loss_scale", "data_parallel_objective",
           "global_contrast_loss", "global_contrast_loss_and_columns"]
