"""An SAE variant defined outside the package, for the CLI test (``class_path: tests.custom_variant.X``)."""

from torch import Tensor

from gs_lightning.saes import SAE


class SoftplusL1SAE(SAE):
    """``f = relu(softplus(pre) - log 2)``; loss MSE + lambda * L1."""

    def __init__(self, d_in: int, d_sae: int, sparsity_coefficient: float = 1.0) -> None:
        super().__init__(d_in, d_sae)
        self.sparsity_coefficient = sparsity_coefficient

    def activation(self, pre: Tensor) -> Tensor:
        return (pre.exp().log1p() - 0.6931471805599453).relu()

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        return {"l1_penalty": warmup * self.sparsity_coefficient * f.sum(-1).mean()}
