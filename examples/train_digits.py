"""Contrastive training (SimCLR) on scikit-learn's digits: fused NT-Xent against the textbook one.

Two copies of one small network start from the same weights and see the same two augmented views
of every image; one is trained with ``fused_losses.nt_xent``, the other with
``fused_losses.reference.nt_xent`` (which builds the 2B x 2B logits). The script shows that the
two losses agree (on the same embeddings to float32 rounding; as training curves, up to that
rounding amplified by training), how long a training step took with each, how much memory one loss
forward + backward needs with each (at the training batch and at larger ones), and that the
embeddings learned something (k-nearest-neighbour accuracy of the digit labels, never used in
training, measured on augmented test images). The curves are saved as a PNG when matplotlib is
installed.

    python examples/train_digits.py               # 20 s to a minute on a 2-core CPU
    python examples/train_digits.py --steps 3     # smoke test

(from a source checkout without installing: PYTHONPATH=. python examples/train_digits.py)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_losses as fl
from fused_losses.cli.progress import ProgressBar

LOSSES = {"fused": fl.nt_xent, "reference": fl.reference.nt_xent}
EMBEDDING_DIM = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="images per step; the loss sees twice as many views (default 512)")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--memory-probe-views", type=int, nargs="*", default=[4096, 8192],
                        help="larger numbers of views at which to also measure the loss memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("digits_loss_curves.png"),
                        help="where to save the loss curves (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_digits(device: torch.device, seed: int):
    """(train images, train labels, test images, test labels); images (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32, device=device)[:, None] / 16
    labels = torch.tensor(digits.target, device=device)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(device)
    test, train = order[:400], order[400:]
    return images[train], labels[train], images[test], labels[test]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of each image: rotation (+-15 degrees), scale, shift, then pixel noise."""
    n = images.shape[0]

    def uniform(low, high):
        return (low + (high - low) * torch.rand(n, generator=generator)).to(images.device)

    angle, scale = uniform(-math.pi / 12, math.pi / 12), uniform(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, uniform(-0.2, 0.2)], 1),
                         torch.stack([sin, cos, uniform(-0.2, 0.2)], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    noise = 0.1 * torch.randn(views.shape, generator=generator).to(images.device)
    return (views + noise).flatten(1)


class Encoder(nn.Module):
    """An MLP backbone (the representation) and a projection head (what the loss sees)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, EMBEDDING_DIM))

    def forward(self, x):
        return self.head(self.backbone(x))


@torch.no_grad()
def knn_accuracy(model: Encoder, train_x, train_y, test_views, test_y, k: int = 5) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine similarity of backbone features) of
    augmented test images among the clean training images."""
    train_features = F.normalize(model.backbone(train_x.flatten(1)), dim=1)
    test_features = F.normalize(model.backbone(test_views), dim=1)
    neighbours = (test_features @ train_features.T).topk(k, dim=1).indices
    votes = F.one_hot(train_y[neighbours], num_classes=10).sum(dim=1)
    return (votes.argmax(dim=1) == test_y).float().mean().item()


def peak_loss_memory(loss_fn, views: int, temperature: float, device: torch.device) -> int:
    """Peak bytes allocated during one forward + backward of loss_fn on 2 x (views / 2) random
    embeddings."""
    z1, z2 = (torch.randn(views // 2, EMBEDDING_DIM, device=device, requires_grad=True)
              for _ in range(2))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss_fn(z1, z2, temperature).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # On the CPU, replay the allocations and frees the profiler records.
    cpu = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[cpu], profile_memory=True) as prof:
        loss_fn(z1, z2, temperature).backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    allocated = peak = 0
    for event in events:
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


def train(args, device):
    """Train one model per loss in lockstep; returns their loss curves and step times."""
    train_x, train_y, test_x, test_y = load_digits(device, args.seed)
    torch.manual_seed(args.seed)
    models = {"fused": Encoder().to(device)}
    models["reference"] = copy.deepcopy(models["fused"])
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=args.lr)
                  for name, model in models.items()}
    generator = torch.Generator().manual_seed(args.seed)
    test_views = augment(test_x, generator)
    knn_before = knn_accuracy(models["fused"], train_x, train_y, test_views, test_y)
    curves = {name: [] for name in [*models, "reference on fused embeddings"]}
    seconds = {name: 0.0 for name in models}
    with ProgressBar(args.steps, "training") as bar:
        for _ in range(args.steps):
            batch = train_x[torch.randint(0, len(train_x), (args.batch_size,), generator=generator)
                            .to(device)]
            view1, view2 = augment(batch, generator), augment(batch, generator)
            for name, model in models.items():
                started = time.perf_counter()
                z1, z2 = model(view1), model(view2)
                loss = LOSSES[name](z1, z2, args.temperature)
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[name] += time.perf_counter() - started
                curves[name].append(loss.item())
                if name == "fused":
                    with torch.no_grad():
                        same_input = LOSSES["reference"](z1, z2, args.temperature)
                    curves["reference on fused embeddings"].append(same_input.item())
            bar.advance(f"loss {curves['fused'][-1]:.4f} / {curves['reference'][-1]:.4f}")
    knn_after = {name: knn_accuracy(model, train_x, train_y, test_views, test_y)
                 for name, model in models.items()}
    return curves, seconds, knn_before, knn_after


def loss_differences(curves):
    """|fused - reference| at every step: on the same embeddings (the two losses themselves) and
    between the two training runs (float32 rounding, which training then amplifies)."""
    def gaps(other):
        return [abs(a - b) for a, b in zip(curves["fused"], curves[other])]

    return {"same embeddings": gaps("reference on fused embeddings"),
            "between the two runs": gaps("reference")}


def plot(curves, path: pathlib.Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
    for name, style in (("reference", dict(lw=4, alpha=0.4)), ("fused", dict(lw=1.2))):
        top.plot(curves[name], label=f"{name} nt_xent", **style)
    top.set_ylabel("NT-Xent loss")
    top.set_title("SimCLR on sklearn digits: fused vs textbook loss")
    top.legend()
    for label, difference in loss_differences(curves).items():
        bottom.semilogy([max(d, 1e-9) for d in difference], lw=1, label=label)
    bottom.set_ylabel("|fused - reference|")
    bottom.legend(fontsize="small")
    bottom.set_xlabel("step")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"loss curves saved to {path}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if importlib.util.find_spec("sklearn") is None:
        print("this example needs scikit-learn for its data: pip install scikit-learn",
              file=sys.stderr)
        return 1
    print(f"SimCLR on sklearn digits: {args.steps} steps of {args.batch_size} images "
          f"({2 * args.batch_size} views) on {device}")
    curves, seconds, knn_before, knn_after = train(args, device)

    gaps = {label: max(difference) for label, difference in loss_differences(curves).items()}
    print(f"\nloss: first {curves['fused'][0]:.4f}, last fused {curves['fused'][-1]:.4f} / "
          f"reference {curves['reference'][-1]:.4f}")
    print(f"largest |fused - reference|: {gaps['same embeddings']:.1e} on the same embeddings, "
          f"{gaps['between the two runs']:.1e} between the two runs (float32 rounding that "
          f"training amplifies)")
    print(f"kNN accuracy on augmented test digits (labels unused in training): {knn_before:.3f} "
          f"at init, {knn_after['fused']:.3f} fused / {knn_after['reference']:.3f} reference "
          f"after training")
    print("time per training step (encoder + loss + Adam): " + ", ".join(
        f"{name} {1000 * seconds[name] / args.steps:.1f} ms" for name in LOSSES))
    peaks = {views: {name: peak_loss_memory(fn, views, args.temperature, device)
                     for name, fn in LOSSES.items()}
             for views in [2 * args.batch_size, *args.memory_probe_views]}
    print("peak memory of one loss forward + backward:")
    for views, peak in peaks.items():
        sizes = ", ".join(f"{name} {peak[name] / 2**20:8.1f} MiB" for name in LOSSES)
        print(f"  {views:6d} views: {sizes}  "
              f"({peak['reference'] / max(peak['fused'], 1):.1f}x less with fused)")
    print(plot(curves, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
