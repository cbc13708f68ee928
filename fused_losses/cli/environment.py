"""What this machine offers: versions, devices, and each backend's availability."""

import platform

import torch

from fused_losses.backends import BACKENDS, unavailable_reason


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_environment() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"python  {platform.python_version()}",
        f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton  {triton_version}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            lines.append(f"device  cuda:{index} {torch.cuda.get_device_name(index)}")
    else:
        lines.append(f"device  cpu ({torch.get_num_threads()} threads), no CUDA device")
    device = default_device()
    for name in BACKENDS:
        reason = unavailable_reason(name, device)
        lines.append(f"backend {name:<7} " + ("available" if reason is None else f"unavailable: {reason}"))
    return "\n".join(lines)
