"""Plain PIL + NumPy oracle for the MVTec preprocessing (written independently of the library).

torchvision ``Resize(int)`` -> ``CenterCrop`` -> ``ToTensor`` -> ``Normalize``, spelled out
with PIL's own ``crop`` (the library slices a NumPy array instead).
"""

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _resize_shorter(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return im.resize(new, Image.BILINEAR)


def _crop_center(im: Image.Image, crop: int) -> Image.Image:
    w, h = im.size
    top = round((h - crop) / 2.0)  # Python round: ties to even
    left = round((w - crop) / 2.0)
    return im.crop((left, top, left + crop, top + crop))


def image(path, resize=256, crop=224):
    """(crop, crop, 3) float32, normalised."""
    im = Image.open(path).convert("RGB")
    im = _crop_center(_resize_shorter(im, resize), crop)
    x = np.asarray(im).astype(np.float32) / np.float32(255)
    return (x - MEAN) / STD


def mask(path, resize=256, crop=224, threshold=False):
    """(crop, crop) uint8 in {0, 1}: torchvision pipeline + ``.astype(np.uint8)`` (or > 0.5)."""
    im = Image.open(path)
    im = _crop_center(_resize_shorter(im, resize), crop)
    t = np.asarray(im).astype(np.float32) / np.float32(255)  # ToTensor
    if threshold:
        return (t > 0.5).astype(np.uint8)
    return t.astype(np.uint8)  # truncation, as main.py does
