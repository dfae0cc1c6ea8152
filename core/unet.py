"""The lung segmenter's network (:mod:`core.lungs` runs it, :mod:`core.lungs_train` trains it).

A compact, hand-written U-Net (:class:`UNet`; ``arch = "unet"``): 5 down-sampling levels
with 8-16-32-64-128-256 channels, two 3x3 conv-BN-ReLU per encoder level, transposed-
convolution up-sampling, skip concatenation and one 3x3 conv-BN-ReLU per decoder level,
about 1.75 M parameters (7 MB fp32), on a 1-channel 128 x 128 input. Why not
torchvision's LRASPP-MobileNetV3: no ImageNet weights can be downloaded here, LRASPP leans
on a pretrained backbone and predicts at 1/8 resolution (coarse lung borders), whereas a
small U-Net trains from scratch in minutes on a CPU and keeps full-resolution skips for
sharp borders. Why this width: a 16-channel U-Net took ~40 ms per 128 px image on the
shared 2-core CPU; 8 base channels and a single-conv decoder cut the compute ~4x to
0.19 GMAC (13-17 ms of CPU time per image on one thread, see ``python -m core.lungs bench``), and the fifth
level (4 x 4 bottleneck, cheap) gives a receptive field spanning the whole chest, which
keeps the two lungs coherent. For single images on shared cores one torch thread is
fastest: several OpenMP threads wait on each other when other jobs hold the cores.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A compact U-Net: ``depth`` poolings, channels ``base * 2**level``, one logit map out.

    Encoder levels have two 3x3 conv-BN-ReLU blocks; decoder levels (transposed-conv
    up-sampling, skip concatenation) have ``decoder_convs`` of them. The input side must be
    divisible by ``2**depth``.
    """

    def __init__(
        self, base: int = 8, depth: int = 5, decoder_convs: int = 1, in_channels: int = 1
    ) -> None:
        super().__init__()
        chs = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList(
            [_DoubleConv(in_channels, chs[0])]
            + [_DoubleConv(chs[i - 1], chs[i]) for i in range(1, depth + 1)]
        )
        self.ups = nn.ModuleList(
            [nn.ConvTranspose2d(chs[i], chs[i - 1], 2, stride=2) for i in range(depth, 0, -1)]
        )
        dec = _DoubleConv if decoder_convs == 2 else _ConvBNReLU
        if decoder_convs not in (1, 2):
            raise ValueError("decoder_convs must be 1 or 2")
        self.decoders = nn.ModuleList([dec(2 * chs[i - 1], chs[i - 1]) for i in range(depth, 0, -1)])
        self.head = nn.Conv2d(chs[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


DEFAULT_ARCH_PARAMS: dict[str, int] = {"base": 8, "depth": 5, "decoder_convs": 1}


def build_segmenter_model(arch_params: dict[str, Any] | None = None) -> UNet:
    """The U-Net of a weights file's ``arch_params`` (defaults: :data:`DEFAULT_ARCH_PARAMS`)."""
    p = {**DEFAULT_ARCH_PARAMS, **(arch_params or {})}
    return UNet(base=int(p["base"]), depth=int(p["depth"]), decoder_convs=int(p["decoder_convs"]))
