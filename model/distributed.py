"""Process-group helpers that work the same under torchrun, the deepspeed launcher,
`accelerate launch` and plain python (one process): NCCL with CUDA, gloo without."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def share_cpu_threads() -> None:
    """On CPU, give each local rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    torchrun caps ranks at one thread, the deepspeed launcher does not: two ranks each running
    as many threads as there are cores slow a 2-core machine down about eightfold.
    """
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        _, _, local = env_world()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_process_group(use_deepspeed: bool = False, timeout_s: float = 3600) -> None:
    """Join the launcher's process group, if there is one and it is not joined yet. A collective that
    waits longer than ``timeout_s`` raises on the waiting ranks (a dead or hung peer)."""
    if dist.is_initialized() or env_world()[1] == 1 and not use_deepspeed:
        return
    _default_group_timeout(timedelta(seconds=timeout_s))
    if use_deepspeed:
        import deepspeed

        skip_deepspeed_shm_op()
        if "RANK" not in os.environ:  # plain `python`: one process, rendezvous on a free local port
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from loading its shared-memory all-reduce op (call before
    ``deepspeed.init_distributed`` or ``deepspeed.initialize`` builds the backend).

    The op serves only ``inference_all_reduce`` (tensor-parallel inference), which we never call, and it
    costs: under the deepspeed launcher every local rank writes a 66 MiB buffer to /dev/shm that nothing
    ever unlinks, not even a clean exit (138 MB of RAM per 2-rank CPU job, for good: a test suite or a
    sweep of short jobs fills the machine's memory); and loading it JIT-checks the build under a lock file
    in TORCH_EXTENSIONS_DIR that a process killed at that moment leaves behind, after which every start
    waits on it for ever. DeepSpeed loads the op only when it is listed as compatible."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the default of every process group created later. DeepSpeed builds its data- and
    expert-parallel groups with ``new_group(ranks)``, which takes torch's module-level default (30 min for
    gloo, 10 for NCCL), not the world group's timeout, and torch has no public setting for that default:
    without this a hung rank would hold a gradient all-reduce for 30 minutes whatever the config says."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank died, hung past the timeout or became unreachable
    (gloo raises plain RuntimeErrors naming its transport; NCCL raises DistBackendError)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and dist.is_initialized() and any(
        mark in text for mark in ("gloo", "Connection reset by peer", "Connection closed by peer", "NCCL"))


def unresponsive_ranks(wait_s: float) -> list[int] | None:
    """After a failed collective: the ranks that do not check in on the rendezvous store within ``wait_s``
    (dead, hung, or still waiting on another collective), or None when the store cannot be reached
    (it lives with rank 0: rank 0's process or machine is gone). Every surviving rank calls it."""
    import time

    try:
        # The default store is reachable only through a private accessor; wrapped here so an upgrade
        # that renames it breaks in one place (the caller then prints the failure without the rank).
        store = dist.distributed_c10d._get_default_store()
        store.set(f"mmoe/alive/{rank()}", "1")
        keys = {r: f"mmoe/alive/{r}" for r in range(world())}
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r, k in keys.items() if not store.check([k])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 (any failure to reach the store means the same thing here)
        return None


def shutdown() -> None:
    """Leave the process group once every rank is done. Left to interpreter exit, the group's
    threads are torn down in no set order and a rank can abort ("terminate called without an active
    exception", seen in about 1 of 8 two-process gloo runs) after all its work succeeded."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate every rank's rows (first dim may differ by rank), in rank order, on every rank."""
    if world() == 1:
        return t
    if t.dtype == torch.bool:  # gloo cannot all-gather bool tensors
        return gather_rows(t.to(torch.uint8)).bool()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def from_main(obj):
    """Rank 0's ``obj`` on every rank (what rank 0 alone decided: a file check, a lock, a conversion's outcome);
    collective. Every rank passes its own value; only rank 0's is used."""
    return broadcast_object(obj, 0)


def broadcast_object(obj, src: int):
    """Rank ``src``'s ``obj`` (picklable) on every rank; collective."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _as_bytes(t: Tensor) -> Tensor:
    """``t``'s bytes as uint8 rows [len(t), row bytes]: any dtype travels through any backend (gloo has no
    bool, and not every build has bfloat16), bit for bit."""
    if not t.shape[0]:  # reshape cannot infer a row size from no elements
        return torch.empty(0, _row_bytes(tuple(t.shape[1:]), t.dtype), dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], -1)


def _from_bytes(b: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return b.view(dtype).reshape(b.shape[0], *shape)


def broadcast_rows(t: Tensor | None, src: int, rows: int, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """Rank ``src``'s tensor ``t`` [rows, *shape] of ``dtype`` on every rank, bit for bit (the other ranks
    pass None); collective."""
    if world() == 1:
        return t
    if rank() == src:
        buf = _as_bytes(t.to(device))
    else:
        buf = torch.empty(rows, _row_bytes(shape, dtype), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=src)
    return t if rank() == src else _from_bytes(buf, dtype, shape)


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def all_reduce_sum(t: Tensor) -> Tensor:
    """The element-wise sum of every rank's ``t`` (same shape on every rank), on every rank."""
    if world() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def exchange_rows(send: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
    """All-to-all of rows: ``send``'s first ``send_counts[0]`` rows go to rank 0, the next ``send_counts[1]`` to
    rank 1, ...; returns the rows received, rank 0's first (``recv_counts`` of them from each rank), bit for bit;
    collective."""
    if world() == 1:
        return send
    buf = _as_bytes(send)
    out = torch.empty(sum(recv_counts), buf.shape[1], dtype=torch.uint8, device=send.device)
    dist.all_to_all_single(out, buf, recv_counts, send_counts)
    return _from_bytes(out, send.dtype, tuple(send.shape[1:]))


def exchange_counts(counts: list[int], device: torch.device) -> list[int]:
    """What every rank told this one: ``counts[d]`` is what this rank says to rank d; returns, for each rank s,
    what rank s said to this one; collective."""
    if world() == 1:
        return list(counts)
    send = torch.tensor(counts, dtype=torch.int64, device=device)
    out = torch.empty_like(send)
    dist.all_to_all_single(out, send)
    return [int(c) for c in out.tolist()]


def gather_objects(obj):
    """List of every rank's object, in rank order (on every rank)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
