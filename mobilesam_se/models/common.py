"""Small building blocks of the mask decoder and the two-way transformer.

The channel LayerNorm of NCHW maps (neck, mask downscaling, output upscaling) is timm's
`LayerNorm2d`: `F.layer_norm` on a channels-last view, eps 1e-6 and parameters `weight` / `bias`
as SAM's, so official checkpoints load by name.
"""
from __future__ import annotations

from typing import Type

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between (SAM's decoder MLP; keys `layers.<i>`)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MLPBlock(nn.Module):
    """Two-layer feed-forward block of the two-way transformer (keys `lin1`, `lin2`)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))
