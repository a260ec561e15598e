"""Plain-NumPy oracles for experiments.nan_ood.train (written from torch's documented semantics)."""

import math

import numpy as np


def torch_sgd_steps(params, grads_seq, lrs, *, momentum, weight_decay, nesterov=False):
    """torch.optim.SGD (dampening 0) over a sequence of gradients; returns the parameters.

    Per step: g = grad + wd * p; buf = g (first step) else momentum * buf + g;
    d = g + momentum * buf (nesterov) else buf; p = p - lr * d.
    """
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    buf = {}
    for grads, lr in zip(grads_seq, lrs):
        for k in p:
            g = np.asarray(grads[k], np.float64) + weight_decay * p[k]
            if momentum:
                buf[k] = g.copy() if k not in buf else momentum * buf[k] + g
                d = g + momentum * buf[k] if nesterov else buf[k]
            else:
                d = g
            p[k] = p[k] - lr * d
    return p


def multistep_lr(epoch, base_lr, milestone_epochs, gamma):
    """torch MultiStepLR: lr during ``epoch`` (0-based)."""
    return base_lr * gamma ** sum(1 for m in milestone_epochs if m <= epoch)


def cosine_lr(step, base_lr, total_steps):
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def crop_flip(images, offsets, flips, padding):
    """Zero-pad, crop at (top, left), mirror horizontally where ``flips``."""
    images = np.asarray(images)
    b, h, w, c = images.shape
    out = np.empty_like(images)
    for i in range(b):
        padded = np.zeros((h + 2 * padding, w + 2 * padding, c), images.dtype)
        padded[padding:padding + h, padding:padding + w] = images[i]
        t, l = int(offsets[i][0]), int(offsets[i][1])
        crop = padded[t:t + h, l:l + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def nan_score(a):
    a = np.asarray(a, np.float64)
    cnt = (a > 0).sum(1)
    return np.where(cnt > 0, np.abs(a).sum(1) / np.maximum(cnt, 1), 0.0)
