"""PyTorch twin of nfed's W-Net-CD: the same layers, the same forward and the same parameter names.

An independent reference for `nfed bench step` (speed) and the parity and export tests (values), shipped in
the package so an installed nfed finds it. `state_dict()` keys equal nfed's (`encoder.e1.conv1.weight`, ...)
apart from BatchNorm's extra `num_batches_tracked`, so weights move 1:1 with `load_nfed_state` / `nfed_state`.
Optional: importing this module imports torch, and without torch raises NfedError; only benchmark and test
code imports it, never the product (nfed's runtime does not depend on torch).
"""
from __future__ import annotations

import numpy as np

from nfed.common.errors import NfedError

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError:
    raise NfedError("PyTorch is not installed: pip install torch") from None


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


def _widths(width: int) -> list[int]:
    return [width * 2 ** level for level in range(5)]


class UNetPath(nn.Module):
    """e1..e5, up4..up1, d4..d1, head; siamese = the U-Encoder (both dates as one batch, fused skips)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, siamese: bool):
        super().__init__()
        self.siamese = siamese
        c = _widths(width)
        m = 2 if siamese else 1
        self.e1, self.e2, self.e3 = ConvBlock(in_channels, c[0]), ConvBlock(c[0], c[1]), ConvBlock(c[1], c[2])
        self.e4, self.e5 = ConvBlock(c[2], c[3]), ConvBlock(c[3], c[4])
        self.up4 = nn.ConvTranspose2d(m * c[4], c[3], 2, stride=2)
        self.d4 = ConvBlock((1 + m) * c[3], c[3])
        self.up3 = nn.ConvTranspose2d(c[3], c[2], 2, stride=2)
        self.d3 = ConvBlock((1 + m) * c[2], c[2])
        self.up2 = nn.ConvTranspose2d(c[2], c[1], 2, stride=2)
        self.d2 = ConvBlock((1 + m) * c[1], c[1])
        self.up1 = nn.ConvTranspose2d(c[1], c[0], 2, stride=2)
        self.d1 = ConvBlock((1 + m) * c[0], c[0])
        self.head = nn.Conv2d(c[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for level, block in enumerate((self.e1, self.e2, self.e3, self.e4, self.e5)):
            if level:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(torch.cat(torch.chunk(x, 2, 0), 1) if self.siamese else x)
        d = skips[4]
        for up, block, skip in ((self.up4, self.d4, skips[3]), (self.up3, self.d3, skips[2]),
                                (self.up2, self.d2, skips[1]), (self.up1, self.d1, skips[0])):
            d = block(torch.cat([up(d), skip], 1))
        return self.head(d)


class WNetCD(nn.Module):
    def __init__(self, width: int = 8, classes: int = 2, lambda_rec: float = 0.1):
        super().__init__()
        self.lambda_rec = float(lambda_rec)
        self.encoder = UNetPath(3, width, classes, siamese=True)
        self.decoder = UNetPath(classes, width, 6, siamese=False)

    def encode(self, past, current):
        """Change logits: both dates as one batch through the shared contracting path, as nfed does."""
        return self.encoder(torch.cat([past, current], 0))

    def forward(self, past, current):
        logits = self.encode(past, current)
        if self.lambda_rec == 0:
            return logits, None
        return logits, self.decoder(torch.softmax(logits, 1))

    def loss(self, past, current, mask):
        logits, reconstruction = self.forward(past, current)
        ce = F.cross_entropy(logits, (mask > 0).long() if logits.shape[1] == 2 else mask.long())
        if reconstruction is None:
            return ce
        return ce + self.lambda_rec * F.mse_loss(reconstruction, torch.cat([past, current], 1))


def nfed_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The twin's weights and BN statistics under nfed's names (num_batches_tracked dropped)."""
    return {name: value.detach().cpu().numpy().copy() for name, value in model.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def load_nfed_state(model: nn.Module, state: dict) -> None:
    """Copy an nfed state dict (name -> array) into the twin; every name must match."""
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if own != set(state):
        raise KeyError(f"names differ: missing {sorted(own - set(state))[:3]}, "
                       f"unexpected {sorted(set(state) - own)[:3]}")
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name in state:
                value.copy_(torch.from_numpy(np.asarray(state[name])))
