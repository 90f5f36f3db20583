"""Classification heads: margins (CombinedMarginLoss), model-parallel Partial FC, row-sparse optimizers."""
from heads.margin import CombinedMarginLoss
from heads.partial_fc import PartialFC
from heads.class_store import RowGrad, scale_head_grad_
from heads.sparse_optim import RowSparseAdamW, RowSparseSGD, build_head_optimizer

__all__ = ["CombinedMarginLoss", "PartialFC", "RowGrad", "RowSparseSGD", "RowSparseAdamW", "build_head_optimizer",
           "scale_head_grad_"]
