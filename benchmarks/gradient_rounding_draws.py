"""How often tests/test_losses.py's gradient criterion fails on random draws of SupCon at N = 3,
D = 64, normalize=False, 16-bit, per backend, with raw randn features (the test's inputs before
they were scaled to rows of norm ~3, see test_losses._embeddings): the saturated-softmax case
where the loss is flat and its gradient is the rounding of two cancelling terms. Prints the first
failing draws in detail (per-anchor losses, lse errors, off-diagonal S).

    python -m benchmarks.gradient_rounding_draws 250 torch cuda triton    # GPU, ~25 s
    python -m benchmarks.gradient_rounding_draws 300 torch                # CPU
"""
import sys
import torch
import fused_losses as fl
from fused_losses import backends, reference
from tests.test_losses import DTYPE_TOLERANCE, _supcon_labels
dev = "cuda" if torch.cuda.is_available() else "cpu"
names = sys.argv[2:] or (["torch", "cuda", "triton"] if dev == "cuda" else ["torch"])
draws = int(sys.argv[1])
fails = {b: 0 for b in names}
shown = 0
for seed in range(draws):
    for dtype in (torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(3, 64, generator=gen, dtype=torch.float64).to(dtype).to(dev)
        labels = _supcon_labels(3, gen).to(dev)
        t = torch.tensor(0.1, dtype=torch.float64, device=dev)
        a64 = a.double().requires_grad_(True)
        want = reference.supcon_loss(a64, labels, t, normalize=False)
        gw, = torch.autograd.grad(want, a64)
        tol = DTYPE_TOLERANCE[dtype]
        for b in names:
            x = a.clone().requires_grad_(True)
            got = fl.supcon_loss(x, labels, t, backend=b, normalize=False)
            g, = torch.autograd.grad(got, x)
            bad = ((g.double() - gw).abs() > tol * (1 + gw.abs().max()) + tol * gw.abs()).any().item()
            if bad:
                fails[b] += 1
                if shown < 6:
                    shown += 1
                    ones = torch.ones(3, device=dev)
                    k = backends.get_kernels(b, torch.device(dev))
                    lr, _ = k.lse_forward(q=a, k=a, inv_norm_q=ones, inv_norm_k=ones, scale=(1 / t).float(),
                                          diag_offset=0, want_rows=True, want_cols=False)
                    s = (a.double() @ a.double().T) / t.double(); s.fill_diagonal_(float("-inf"))
                    per = fl.supcon_loss(a, labels, t, backend=b, normalize=False, reduction="none")
                    print(f"seed {seed} {str(dtype)[6:]} {b}: grad err {(g.double()-gw).abs().max().item():.3g} |gw| {gw.abs().max().item():.3g}"
                          f" loss {got.item():.6g} want {want.item():.6g} per {per.tolist()} labels {labels.tolist()}\n"
                          f"   lse err {(lr.double() - torch.logsumexp(s, 1)).tolist()}  S offdiag {s[~torch.isinf(s)].tolist()}", flush=True)
print("draws", draws, "x 2 dtypes; failing the test's criterion:", fails)
