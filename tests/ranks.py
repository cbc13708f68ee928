"""Run a function on several CPU processes joined in a gloo process group, and collect what each
rank returned."""

import datetime
import os
import pathlib
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out_dir, function, args):
    torch.set_num_threads(1)
    # A rank waiting for a collective the others never call fails after a minute, not 30.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(function(rank, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(function, world_size: int, out_dir, *args) -> list:
    """[function(rank, *args) for each rank], each run in its own process of a gloo group of
    ``world_size``; ``function`` must be importable (module level) and its result saveable by
    torch.save. ``out_dir`` receives the results."""
    mp.spawn(_rank_main, args=(world_size, free_port(), str(out_dir), function, args),
             nprocs=world_size, join=True)
    return [torch.load(pathlib.Path(out_dir) / f"rank{rank}.pt") for rank in range(world_size)]
