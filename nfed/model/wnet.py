"""W-Net-CD: the study's 46-layer dual-branch change-detection network (spec: ARCHITECTURE.md).

Structure (widths c1..c5 = w, 2w, 4w, 8w, 16w; K classes; "block" = conv3x3-BN-ReLU-conv3x3-BN-ReLU):
- U-Encoder, siamese contracting path e1 (3->c1), e2..e5 (maxpool 2x2 first) shared by both dates; both dates
  run as ONE batch of 2N (one conv call per layer instead of two), so BatchNorm batch statistics are taken over
  both dates together. Fusion f_l = concat(a_l, b_l) on channels at every scale. Expansive path
  up4 = deconv(f5: 2*c5 -> c4), d4(concat(up4, f4): 3*c4 -> c4), then up_l = deconv(d_{l+1} -> c_l),
  d_l(concat(up_l, f_l): 3*c_l -> c_l) for l = 3..1; head = conv1x1 (c1 -> K) giving the change logits.
- U-Decoder, a plain U-Net on softmax(logits): e1 (K->c1), e2..e5, up4 (c5->c4), d4 (2*c4->c4) ... d1,
  head conv1x1 (c1 -> 6) reconstructing concat(past, current). Skipped in forward when lambda_rec == 0.
Weighted layers: 2 x (9 blocks x 2 conv3x3 + 4 deconv + 1 conv1x1) = 46.
Trainable parameters: 16425 w^2 + (615 + 10 K) w + K + 6 (67,317,448 at w = 64, K = 2; the study's "67.3M").

Parameter names (stable; checkpoints and the PyTorch twin nfed/benchmarks/torch_twin.py use exactly these):
  <part>.<layer>.<sub>.<tensor>
  part   = encoder | decoder
  layer  = e1..e5, d4..d1 (blocks), up4..up1 (deconv), head (conv1x1)
  sub    = conv1, bn1, conv2, bn2 inside a block (absent for up*/head)
  tensor = weight, bias (conv [out, in, kh, kw]; deconv [in, out, 2, 2]; BN gamma/beta),
           running_mean, running_var (BN state, not trained, averaged by FedAvg)
  e.g. encoder.e1.conv1.weight, encoder.up4.bias, decoder.d1.bn2.running_var, decoder.head.weight.

Loss = cross_entropy(logits, target) + lambda_rec * mse(reconstruction, concat(past, current)); for K = 2 the
target is the mask binarised (value > 0), for K = 5 the change type (0 none, 1..4).
"""
from __future__ import annotations

import numpy as np

from nfed.common import backend
from nfed.core import functions as F
from nfed.core import nn
from nfed.core.autograd import Function, Tensor, as_tensor, no_grad
from nfed.core.functions.layout import concatenate

LEVELS = 5
RECONSTRUCTION_CHANNELS = 6


class ConvBlock(nn.Module):
    """The W-Net "module": conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU (padding 1, size kept)."""

    def __init__(self, in_channels: int, out_channels: int, rng: np.random.Generator):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, rng=rng)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, rng=rng)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self._unit(self._unit(x, self.conv1, self.bn1), self.conv2, self.bn2)

    @staticmethod
    def _unit(x, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        """relu(bn(conv(x))), fused into one op on the CPU (functions/fused.py)."""
        return F.conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                              bn.training, bn.momentum, bn.eps, conv.padding)


class _DatesToChannels(Function):
    """[2N, C, H, W] (past batch then current batch) -> [N, 2C, H, W] = concat(past, current) on channels.

    The siamese fusion of one scale in a single copy; backward splits the gradient back to the two dates.
    """

    def forward(self, x):
        n = x.shape[0] // 2
        return concatenate((x[:n], x[n:]), axis=1)

    def backward(self, grad):
        c = grad.shape[1] // 2
        return (concatenate((grad[:, :c], grad[:, c:]), axis=0),)


def dates_to_channels(x):
    return _DatesToChannels()(x)


def level_widths(width: int) -> list[int]:
    return [width * 2 ** level for level in range(LEVELS)]


class UNetPath(nn.Module):
    """One U of the W: blocks e1..e5 (maxpool between), deconvs up4..up1, blocks d4..d1, conv1x1 head.

    `siamese=True` is the U-Encoder: the contracting path runs on past and current as one 2N batch and
    every skip/bottom feature is the channel concatenation of both dates (twice the channels). Otherwise it
    is the plain U-Net of the U-Decoder.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, *, siamese: bool,
                 rng: np.random.Generator):
        super().__init__()
        self.siamese = siamese
        c = level_widths(width)
        m = 2 if siamese else 1              # channels of a fused feature per channel of one date
        self.e1 = ConvBlock(in_channels, c[0], rng)
        self.e2 = ConvBlock(c[0], c[1], rng)
        self.e3 = ConvBlock(c[1], c[2], rng)
        self.e4 = ConvBlock(c[2], c[3], rng)
        self.e5 = ConvBlock(c[3], c[4], rng)
        self.up4 = nn.ConvTranspose2d(m * c[4], c[3], 2, stride=2, rng=rng)
        self.d4 = ConvBlock((1 + m) * c[3], c[3], rng)
        self.up3 = nn.ConvTranspose2d(c[3], c[2], 2, stride=2, rng=rng)
        self.d3 = ConvBlock((1 + m) * c[2], c[2], rng)
        self.up2 = nn.ConvTranspose2d(c[2], c[1], 2, stride=2, rng=rng)
        self.d2 = ConvBlock((1 + m) * c[1], c[1], rng)
        self.up1 = nn.ConvTranspose2d(c[1], c[0], 2, stride=2, rng=rng)
        self.d1 = ConvBlock((1 + m) * c[0], c[0], rng)
        self.head = nn.Conv2d(c[0], out_channels, 1, rng=rng)

    def forward(self, x):
        skips = []
        for level, block in enumerate((self.e1, self.e2, self.e3, self.e4, self.e5)):
            if level:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(dates_to_channels(x) if self.siamese else x)
        d = skips[4]
        for up, block, skip in ((self.up4, self.d4, skips[3]), (self.up3, self.d3, skips[2]),
                                (self.up2, self.d2, skips[1]), (self.up1, self.d1, skips[0])):
            d = block(F.concat([up(d), skip], axis=1))
        return self.head(d)


class UEncoder(UNetPath):
    """Siamese contracting path, fusion by concatenation, expansive path and the change head."""

    def __init__(self, width: int, classes: int, rng: np.random.Generator):
        super().__init__(3, width, classes, siamese=True, rng=rng)

    def forward(self, past, current):
        return super().forward(F.concat([past, current], axis=0))   # both dates through shared weights


class UDecoder(UNetPath):
    """Plain U-Net from the K-channel class probabilities to the 6-channel (past, current) image pair."""

    def __init__(self, width: int, classes: int, rng: np.random.Generator):
        super().__init__(classes, width, RECONSTRUCTION_CHANNELS, siamese=False, rng=rng)


class WNetCD(nn.Module):
    """W-Net for change detection: U-Encoder (segmentation) + U-Decoder (reconstruction regulariser)."""

    def __init__(self, width: int = 8, classes: int = 2, lambda_rec: float = 0.1,
                 rng: np.random.Generator | None = None):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if classes not in (2, 5):
            raise ValueError(f"classes must be 2 (change / no change) or 5 (no change + 4 types), got {classes}")
        if lambda_rec < 0:
            raise ValueError(f"lambda_rec must be >= 0, got {lambda_rec}")
        rng = np.random.default_rng() if rng is None else rng
        self.width = int(width)
        self.classes = int(classes)
        self.lambda_rec = float(lambda_rec)
        self.encoder = UEncoder(self.width, self.classes, rng)
        self.decoder = UDecoder(self.width, self.classes, rng)

    def forward(self, past, current):
        """(change logits [N, K, H, W], reconstruction [N, 6, H, W] or None when lambda_rec == 0)."""
        _check_pair(past, current)
        logits = self.encoder(past, current)
        if self.lambda_rec == 0:
            return logits, None
        return logits, self.decoder(F.softmax(logits, axis=1))

    def loss(self, past, current, mask):
        """(total, cross-entropy, reconstruction MSE) Tensors; rec is 0 when lambda_rec == 0."""
        logits, reconstruction = self.forward(past, current)
        return self.loss_of_outputs(logits, reconstruction, past, current, mask)

    def loss_of_outputs(self, logits, reconstruction, past, current, mask):
        """The loss of already computed forward outputs (lets evaluation reuse one forward pass)."""
        ce = F.cross_entropy(logits, self.target(mask))
        if reconstruction is None:
            return ce, ce, as_tensor(ce.data * 0)
        pair = _raw(past), _raw(current)
        xp = backend.array_module(*pair)
        rec = F.mse_loss(reconstruction, xp.concatenate(pair, axis=1))
        return ce + rec * self.lambda_rec, ce, rec

    def target(self, mask):
        """Class targets [N, H, W] int64 from a stored mask (binarised for K = 2)."""
        mask = _raw(mask)
        xp = backend.array_module(mask)
        if self.classes == 2:
            return (mask > 0).astype(xp.int64)
        return xp.clip(mask, 0, self.classes - 1).astype(xp.int64)

    def predict(self, past, current):
        """Class map [N, H, W] (int64) from the U-Encoder alone, in eval mode, without building a graph."""
        data = self.change_logits(past, current)
        return backend.array_module(data).argmax(data, axis=1).astype(np.int64)

    def change_logits(self, past, current):
        """Raw change logits [N, K, H, W] of the U-Encoder alone, in eval mode, without building a graph."""
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                logits = self.encoder(past, current)
        finally:
            self.train(was_training)
        return logits.data


def weighted_layers(model: nn.Module) -> list[dict]:
    """The model's convolution and deconvolution layers (BatchNorm excluded) in definition order."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = module.weight
            kind = "deconv" if isinstance(module, nn.ConvTranspose2d) else "conv"
            c_in, c_out = (weight.shape[0], weight.shape[1]) if kind == "deconv" else (weight.shape[1], weight.shape[0])
            params = sum(int(np.prod(p.shape)) for _, p in module.named_parameters())
            rows.append({"name": name, "kind": kind, "in": int(c_in), "out": int(c_out),
                         "kernel": f"{weight.shape[2]}x{weight.shape[3]}", "parameters": params})
    return rows


def parameter_count(width: int, classes: int) -> int:
    """Trainable parameters of W-Net-CD at this width without building it (the formula in this module's
    docstring; every channel count is a multiple of the width or a constant)."""
    return 16425 * width * width + (615 + 10 * classes) * width + classes + 6


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are state, not counted)."""
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _check_pair(past, current) -> None:
    p, c = tuple(past.shape), tuple(current.shape)
    if p != c:
        raise ValueError(f"past {p} and current {c} must have the same shape")
    if len(p) != 4 or p[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {p}")
    if p[2] % 16 or p[3] % 16:
        raise ValueError(f"image height and width must be multiples of 16 (4 poolings), got {p[2]}x{p[3]}")
