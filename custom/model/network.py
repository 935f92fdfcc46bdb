"""The two-stage cascaded U-Net of Jiang et al., built from MONAI's SegResNet blocks.

Z. Jiang, C. Ding, M. Liu, D. Tao, "Two-Stage Cascaded U-Net: 1st Place Solution to BraTS Challenge 2019
Segmentation Task", BrainLes 2019, LNCS 11992, pp. 231-241.

Both stages are the residual U-Net of Table 1: an initial 3x3x3 convolution with dropout, pre-activation
residual blocks (GN-ReLU-Conv3-GN-ReLU-Conv3 plus identity; MONAI's ``ResBlock``) repeated 1, 2, 2, 4 per
encoder level with stride-2 convolutions doubling the channels in between, and a decoder that per level halves
the channels with a 1x1x1 convolution, up-samples, adds the encoder's skip and applies one residual block;
each decoder ends with the tables' EndConv, a 1x1x1 convolution to the 3 region logits. Stage 2 (Table 2) sees
the 4 sequences concatenated with stage 1's 3 probability maps, doubles the filters, and has two decoders on
one encoder: one up-sampling with transposed convolutions (used at inference) and one with trilinear
interpolation (a training-time regulariser only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks.segresnet_block import ResBlock, get_conv_layer, get_upsample_layer
from monai.networks.layers.factories import Dropout
from monai.networks.layers.utils import get_norm_layer
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedSequential", "ResidualEncoder", "ResidualDecoder", "ResidualUNet", "CascadedUNet"]


class CheckpointedSequential(nn.Sequential):
    """``nn.Sequential`` whose activations are recomputed in backward when ``checkpointing`` is on (the paper's
    12 GB setting). TorchScript compiles it as a plain ``Sequential`` (``torch.utils.checkpoint`` cannot be
    scripted and is only for training), and its state-dict keys are those of ``nn.Sequential``."""

    def __init__(self, *modules: nn.Module, checkpointing: bool = False) -> None:
        super().__init__(*modules)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self.checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return self._checkpointed(x)
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(super().forward, x, use_reentrant=False)


class ResidualEncoder(nn.Module):
    """Encoder of Table 1: InitConv + dropout, then per level [stride-2 Conv3 (doubling channels)] + ResBlocks.

    Returns the feature map of every level, finest first (these are the decoder's skips).
    """

    def __init__(
        self,
        in_channels: int,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        dropout_prob: float | None = 0.2,
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        act: tuple | str = ("RELU", {"inplace": True}),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.init_conv = get_conv_layer(3, in_channels, init_filters)
        self.dropout = Dropout[Dropout.DROPOUT, 3](dropout_prob) if dropout_prob else nn.Identity()
        self.levels = nn.ModuleList()
        for level, n_blocks in enumerate(blocks_down):
            channels = init_filters * 2**level
            down = get_conv_layer(3, channels // 2, channels, stride=2) if level > 0 else nn.Identity()
            blocks = [ResBlock(3, channels, norm=norm, act=act) for _ in range(n_blocks)]
            self.levels.append(CheckpointedSequential(down, *blocks, checkpointing=gradient_checkpointing))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.dropout(self.init_conv(x))
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class ResidualDecoder(nn.Module):
    """Decoder of Table 1: per level Conv1 (halve channels) + up-sampling + additive skip + ResBlocks; Conv1 head.

    ``upsample_mode="deconv"`` is the ConvTranspose 2x2x2 decoder, ``"nontrainable"`` the trilinear one (Table 2).
    The head is the tables' EndConv, a 1x1x1 convolution with bias on the last residual block's output.
    ``preactivated_head=True`` puts GroupNorm and ReLU before it, as this bundle did before it followed the
    tables: weights trained that way load only into that head (state-dict keys ``head.0``/``head.2`` instead of
    ``head.conv``).
    """

    def __init__(
        self,
        out_channels: int = 3,
        init_filters: int = 16,
        blocks_up: Sequence[int] = (1, 1, 1),
        upsample_mode: str = "deconv",
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        act: tuple | str = ("RELU", {"inplace": True}),
        gradient_checkpointing: bool = False,
        preactivated_head: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        n_up = len(blocks_up)
        self.upsamples = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i, n_blocks in enumerate(blocks_up):
            channels = init_filters * 2 ** (n_up - i)
            self.upsamples.append(
                nn.Sequential(
                    get_conv_layer(3, channels, channels // 2, kernel_size=1),
                    get_upsample_layer(3, channels // 2, upsample_mode=upsample_mode),
                )
            )
            blocks = [ResBlock(3, channels // 2, norm=norm, act=act) for _ in range(n_blocks)]
            self.blocks.append(CheckpointedSequential(*blocks, checkpointing=gradient_checkpointing))
        end_conv = get_conv_layer(3, init_filters, out_channels, kernel_size=1, bias=True)
        if preactivated_head:
            norm_layer = get_norm_layer(name=norm, spatial_dims=3, channels=init_filters)
            self.head = nn.Sequential(norm_layer, nn.ReLU(), end_conv)
        else:
            self.head = end_conv

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skips = features[::-1]
        x = skips[0]
        # zip over the two ModuleLists only and index the skips: TorchScript needs loops of static length
        for level, (upsample, blocks) in enumerate(zip(self.upsamples, self.blocks)):
            x = blocks(upsample(x) + skips[level + 1])
        return self.head(x)


class ResidualUNet(nn.Module):
    """One stage of the cascade (Table 1): a ``ResidualEncoder`` and a ConvTranspose ``ResidualDecoder``."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout_prob: float | None = 0.2,
        gradient_checkpointing: bool = False,
        preactivated_head: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = ResidualEncoder(
            in_channels, init_filters, blocks_down, dropout_prob, gradient_checkpointing=gradient_checkpointing
        )
        self.decoder = ResidualDecoder(
            out_channels,
            init_filters,
            blocks_up,
            "deconv",
            gradient_checkpointing=gradient_checkpointing,
            preactivated_head=preactivated_head,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class CascadedUNet(nn.Module):
    """Two-stage cascaded U-Net (Jiang et al., BraTS 2019, Tables 1 and 2).

    Stage 1 segments the 4 sequences coarsely; stage 2 takes the sequences and stage 1's sigmoid probabilities
    (7 channels) and refines them. Gradients flow from stage 2 into stage 1 (no ``detach``): the paper trains
    the cascade end to end.

    In ``train()`` mode ``forward`` returns the logits of all heads as a list
    ``[stage1, stage2_deconv, stage2_trilinear]`` (the last only when ``trilinear_decoder``); in ``eval()`` mode
    it returns the stage 2 deconvolution logits alone, ``(B, out_channels, H, W, D)``, channels TC, WT, ET.
    Spatial sizes must be divisible by 8 (three stride-2 levels).

    Args:
        in_channels: MR sequences (T1, T1c, T2, FLAIR).
        out_channels: regions (TC, WT, ET).
        init_filters: stage 1 filters; stage 2 uses twice as many (16 and 32 in the paper).
        blocks_down: residual blocks per encoder level.
        blocks_up: residual blocks per decoder level.
        dropout_prob: dropout after each stage's initial convolution.
        trilinear_decoder: build stage 2's training-only trilinear decoder.
        gradient_checkpointing: recompute residual blocks in backward to save memory.
        preactivated_head: GroupNorm-ReLU before each head's 1x1x1 convolution, for checkpoints trained before
            the heads followed Tables 1 and 2 (a plain Conv1, the default).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout_prob: float | None = 0.2,
        trilinear_decoder: bool = True,
        gradient_checkpointing: bool = False,
        preactivated_head: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(f"blocks_up needs len(blocks_down) - 1 = {len(blocks_down) - 1} entries, got {blocks_up}.")
        self.divisor = 2 ** (len(blocks_down) - 1)
        self.stage1 = ResidualUNet(
            in_channels,
            out_channels,
            init_filters,
            blocks_down,
            blocks_up,
            dropout_prob,
            gradient_checkpointing,
            preactivated_head,
        )
        stage2_filters = 2 * init_filters
        self.stage2_encoder = ResidualEncoder(
            in_channels + out_channels,
            stage2_filters,
            blocks_down,
            dropout_prob,
            gradient_checkpointing=gradient_checkpointing,
        )
        head = {"gradient_checkpointing": gradient_checkpointing, "preactivated_head": preactivated_head}
        self.stage2_deconv_decoder = ResidualDecoder(out_channels, stage2_filters, blocks_up, "deconv", **head)
        self.stage2_trilinear_decoder = (
            ResidualDecoder(out_channels, stage2_filters, blocks_up, "nontrainable", **head)
            if trilinear_decoder
            else None
        )

    def _check_shape(self, x: torch.Tensor) -> None:
        divisible = x.ndim == 5
        for size in x.shape[2:]:  # a loop, not a filtered comprehension: TorchScript compiles this method too
            divisible = divisible and size % self.divisor == 0
        if not divisible:
            raise ValueError(
                f"CascadedUNet expects (B, C, H, W, D) with H, W, D divisible by {self.divisor}, got {list(x.shape)}; "
                "pad the input (e.g. monai.transforms.DivisiblePad(k=8))."
            )

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_shape(image)
        stage1_logits = self.stage1(image)
        stage2_input = torch.cat([image, torch.sigmoid(stage1_logits)], dim=1)
        stage2_features = self.stage2_encoder(stage2_input)
        stage2_deconv_logits = self.stage2_deconv_decoder(stage2_features)
        if not self.training:
            return stage2_deconv_logits
        heads = [stage1_logits, stage2_deconv_logits]
        if self.stage2_trilinear_decoder is not None:
            heads.append(self.stage2_trilinear_decoder(stage2_features))
        return heads
