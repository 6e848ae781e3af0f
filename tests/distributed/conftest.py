"""Multi-process tests on this machine: ``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size,
*args)`` in ``world_size`` fresh processes joined into one gloo job, and returns their results in rank order.

``fn`` must be a module-level function (the processes are spawned, not forked) and return picklable values
(tensors are fine). A failing rank fails the test with that rank's traceback; a hung job fails after
``timeout`` seconds instead of blocking the suite.
"""
from __future__ import annotations

import os
import pickle
import queue
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, world_size: int, store_path: str, results: Any, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # several ranks share two cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        try:
            # plain pickle copies tensor data; the queue's own pickler would pass tensors as shared memory that
            # disappears when this process exits (test transport only, not a file format)
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", traceback.format_exc()))
        raise


def run_distributed(tmp_path: Path, fn: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 240.0) -> List[Any]:
    """Results of ``fn(rank, world_size, *args)`` on every rank of a gloo job of ``world_size`` processes."""
    context = mp.get_context("spawn")
    results = context.Queue()
    # a fresh rendezvous file per job: a test that runs two jobs must not read the first job's addresses
    store = tmp_path / f"store-{uuid.uuid4().hex}"
    # not daemonic: a rank, like a torchrun worker, may start processes of its own (DataLoader workers); the
    # finally below joins or kills every rank
    processes = [context.Process(target=_child, args=(rank, world_size, str(store), results, fn, args))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected: dict = {}
    errors: List[str] = []
    try:
        while len(collected) + len(errors) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"distributed job of {world_size} ranks hung for {timeout:.0f} s "
                            f"(results from ranks {sorted(collected)})")
            if status == "ok":
                collected[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for process in processes:
            process.join(timeout=5 if errors else 30)
            if process.is_alive():
                process.kill()
    if errors:
        pytest.fail("a rank failed:\n" + "\n".join(errors))
    return [collected[rank] for rank in range(world_size)]


@pytest.fixture
def distributed(tmp_path: Path) -> Callable[..., List[Any]]:
    """``distributed(fn, world_size, *args)``: :func:`run_distributed` with this test's temporary directory."""
    def run(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> List[Any]:
        return run_distributed(tmp_path, fn, world_size, *args, timeout=timeout)
    return run
