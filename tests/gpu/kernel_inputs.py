"""Backend-contract arguments on the GPU for the kernel tests of every GPU backend."""

import torch


def inv_norms(x):
    """1 / max(|x_i|, 1e-12) in float32, (rows,)."""
    return 1.0 / x.float().norm(dim=1).clamp_min(1e-12)


def make_inputs(dtype, n, m, d, offset, seed=0, scale=100.0):
    """Kernel arguments for CLIP-like data: k[i] correlated with q[i], so rows have a clear positive."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(n, d, device="cuda", generator=gen)
    k = torch.randn(m, d, device="cuda", generator=gen)
    paired = min(n, m)
    k[:paired] += 2.0 * q[:paired]
    q, k = q.to(dtype), k.to(dtype)
    return dict(q=q, k=k, inv_norm_q=inv_norms(q), inv_norm_k=inv_norms(k),
                scale=torch.tensor(scale, device="cuda"), diag_offset=offset)
