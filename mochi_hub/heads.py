"""Projection and prediction heads of MoCo-v2 and MoCo-v3."""

from __future__ import annotations

from torch import nn

__all__ = ["mocov2_projector", "mocov3_mlp"]


def mocov2_projector(in_dim: int, hidden_dim: int, out_dim: int = 128) -> nn.Sequential:
    """MoCo-v2 projection head: Linear -> ReLU -> Linear, with biases and no BatchNorm.

    Args:
        in_dim: Backbone feature width.
        hidden_dim: Hidden width (MoCo-v2 uses the backbone width).
        out_dim: Embedding dimension (128 in MoCo-v2).

    Returns:
        Module mapping (B, in_dim) to (B, out_dim).
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def mocov3_mlp(
    num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """MoCo-v3 MLP: bias-free Linear layers, BatchNorm + ReLU after each hidden layer.

    With ``last_bn`` the output gets a BatchNorm1d without affine parameters, as in MoCo-v3's
    projectors (and the ViT predictor).

    Args:
        num_layers: Number of Linear layers (3 for the ViT projector, 2 otherwise).
        in_dim: Input width.
        hidden_dim: Hidden width (4096 in MoCo-v3).
        out_dim: Output width (256 in MoCo-v3).
        last_bn: Whether to end with an affine-free BatchNorm1d.

    Returns:
        Module mapping (B, in_dim) to (B, out_dim).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
