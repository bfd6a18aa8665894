"""Independent NumPy (float64) references: one line of maths each, no normzoo code."""

import numpy as np


def f64(x):
    return np.asarray(x, np.float64)


def batch_norm(x, axes, eps, scale=1.0, bias=0.0):
    x = f64(x)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps) * scale + bias


def masked_batch_norm(x, mask, axes, eps):
    x, m = f64(x), np.broadcast_to(mask, x.shape)
    mu = (x * m).sum(axes, keepdims=True) / m.sum(axes, keepdims=True)
    var = (((x - mu) ** 2) * m).sum(axes, keepdims=True) / m.sum(axes, keepdims=True)
    return (x - mu) / np.sqrt(var + eps), mu, var


def batch_renorm(x, axes, eps, ra_mean, ra_var, r_max, d_max):
    x = f64(x)
    mu, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    sb, s = np.sqrt(var + eps), np.sqrt(f64(ra_var) + eps)
    r = np.clip(sb / s, 1 / r_max, r_max)
    d = np.clip((mu - f64(ra_mean)) / s, -d_max, d_max)
    return (x - mu) / sb * r + d


def layer_norm(x, axes, eps):
    return batch_norm(x, axes, eps)


def rms_norm(x, axes, eps):
    x = f64(x)
    return x / np.sqrt((x**2).mean(axes, keepdims=True) + eps)


def group_norm(x, groups, eps):
    x = f64(x)
    g = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    return ((g - g.mean(axes, keepdims=True)) / np.sqrt(g.var(axes, keepdims=True) + eps)).reshape(x.shape)


def instance_norm(x, eps):
    return batch_norm(x, tuple(range(1, np.ndim(x) - 1)), eps)


def weight_norm_dense(x, v, g, b):
    v = f64(v)
    return f64(x) @ (f64(g) * v / np.linalg.norm(v, axis=0)) + f64(b)


def cosine_dense(x, w):
    x, w = f64(x), f64(w)
    return (x @ w) / np.linalg.norm(x, axis=-1, keepdims=True) / np.linalg.norm(w, axis=0)


def patches(x, k):
    """All k x k patches of an NHWC input with 'SAME' zero padding (odd k): (N, H, W, k*k*C)."""
    p = k // 2
    xp = np.pad(f64(x), ((0, 0), (p, p), (p, p), (0, 0)))
    n, h, w, c = x.shape
    return np.stack(
        [xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=3
    ).reshape(n, h, w, k * k * c)


def conv_same(x, kernel):
    k = kernel.shape[0]
    return patches(x, k) @ f64(kernel).reshape(-1, kernel.shape[-1])


def cosine_conv_same(x, kernel):
    k = kernel.shape[0]
    p, w = patches(x, k), f64(kernel).reshape(-1, kernel.shape[-1])
    return (p @ w) / np.linalg.norm(p, axis=-1, keepdims=True) / np.linalg.norm(w, axis=0)


def _groups_of(x, group_size):
    """x (m, C) -> (G, m, c): consecutive channels in groups of min(group_size, C)."""
    m, c_all = x.shape
    c = min(group_size, c_all)
    return f64(x).reshape(m, c_all // c, c).transpose(1, 0, 2)


def iter_norm(x, group_size, iterations, eps):
    """IterNorm on (m, C) as the paper writes it (uncoupled Newton-Schulz): (y, mean, W per group)."""
    out, ws = [], []
    for g in _groups_of(x, group_size):
        xc = g - g.mean(0)
        sigma = xc.T @ xc / len(g) + eps * np.eye(g.shape[1])
        tr = np.trace(sigma)
        p = np.eye(g.shape[1])
        for _ in range(iterations):
            p = (3 * p - np.linalg.matrix_power(p, 3) @ (sigma / tr)) / 2
        w = p / np.sqrt(tr)
        out.append(xc @ w.T)
        ws.append(w)
    return np.concatenate(out, 1), f64(x).mean(0), np.stack(ws)


def zca(x, group_size, eps):
    """Exact ZCA whitening per group, by eigendecomposition: (x - mu) Sigma^{-1/2}."""
    out = []
    for g in _groups_of(x, group_size):
        xc = g - g.mean(0)
        lam, u = np.linalg.eigh(xc.T @ xc / len(g) + eps * np.eye(g.shape[1]))
        out.append(xc @ (u / np.sqrt(lam)) @ u.T)
    return np.concatenate(out, 1)
