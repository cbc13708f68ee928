"""Every available backend against ``fused_losses.reference``: each loss, value and gradients."""

from typing import List, Tuple

import torch

from fused_losses.benchmarking import LOSSES, Case, parity_errors
from fused_losses.cli.progress import ProgressBar

# float32 inputs against the float64 reference of the same values.
RELATIVE_TOLERANCE = 1e-4

CHECK_SHAPE = {"n": 37, "m": 53, "d": 29}


def check_backend_loss(backend: str, loss: str, device: torch.device) -> Tuple[float, float]:
    """(relative error of the loss, largest relative error over the input gradients)."""
    return parity_errors(Case(loss, backend, CHECK_SHAPE["n"], CHECK_SHAPE["m"], CHECK_SHAPE["d"],
                              "float32", str(device)))


def run_selfcheck(backends: List[str], device: torch.device) -> Tuple[str, bool]:
    """A pass / fail table over backends x losses, and whether everything passed."""
    rows, all_passed = [], True
    with ProgressBar(len(backends) * len(LOSSES), "self-check") as bar:
        for backend in backends:
            for loss in LOSSES:
                try:
                    loss_error, grad_error = check_backend_loss(backend, loss, device)
                    passed = loss_error <= RELATIVE_TOLERANCE and grad_error <= RELATIVE_TOLERANCE
                    detail = f"{loss_error:9.2e} {grad_error:9.2e}"
                except Exception as error:  # a crash is a failed check, shown in the table
                    passed, detail = False, f"error: {type(error).__name__}: {error}"[:80]
                all_passed &= passed
                rows.append(f"{backend:<8} {loss:<9} {detail:<20} {'PASS' if passed else 'FAIL'}")
                bar.advance(f"{backend} {loss}")
    header = f"{'backend':<8} {'loss':<9} {'loss err':>9} {'grad err':>9} result"
    return "\n".join([header] + rows), all_passed
