"""Image quality measures for the tests and benchmarks: how close one downscale is to another."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _local_mean(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size×size window (valid positions only), through an integral image."""
    total = np.pad(values, ((1, 0), (1, 0))).cumsum(axis=0).cumsum(axis=1)
    window = total[size:, size:] - total[:-size, size:] - total[size:, :-size] + total[:-size, :-size]
    return window / (size * size)


def ssim(a: Image.Image, b: Image.Image, window: int = 7) -> float:
    """Mean structural similarity of the luminance of two images of the same size (Wang et al.
    2004, uniform 7×7 window as in scikit-image); 1.0 means identical."""
    if a.size != b.size:
        raise ValueError(f'images differ in size: {a.size} and {b.size}')
    x = np.asarray(a.convert('L'), dtype=np.float64)
    y = np.asarray(b.convert('L'), dtype=np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    n = window * window
    mean_x, mean_y = _local_mean(x, window), _local_mean(y, window)
    correction = n / (n - 1)     # sample (co)variances
    var_x = (_local_mean(x * x, window) - mean_x ** 2) * correction
    var_y = (_local_mean(y * y, window) - mean_y ** 2) * correction
    cov = (_local_mean(x * y, window) - mean_x * mean_y) * correction
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over the RGB channels."""
    x = np.asarray(a.convert('RGB'), dtype=np.float64)
    y = np.asarray(b.convert('RGB'), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float('inf') if mse == 0 else 10 * np.log10(255 ** 2 / mse)
