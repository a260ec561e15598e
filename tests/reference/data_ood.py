"""Plain oracle for tailedcore_jax.data.ood.resize_center_crop (torchvision semantics)."""

import numpy as np
from PIL import Image


def resize_center_crop(image, size):
    """Resize (shorter side = size, longer = int(size * long / short), PIL bilinear),
    then crop the centre with offsets int(round((H - size) / 2))."""
    img = Image.fromarray(np.asarray(image))
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    arr = np.asarray(img)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return arr[top:top + size, left:left + size]
