"""Run a test body in N gloo processes on CPU (torch.multiprocessing spawn, file rendezvous)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args):
    torch.set_num_threads(1)  # N processes share a few CI cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # every rank's collectives (FSDP2's are asynchronous) finish before any rank tears the group down:
        # a group destroyed under a peer's pending work aborts that peer ("terminate called without an
        # active exception", seen once in CI under load)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world=2):
    """fn(rank, world, *args) in `world` processes; a failure in any rank fails the test with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world, join=True)
