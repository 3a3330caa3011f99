"""Process-group set-up in one place: join torch.distributed (under torchrun's environment or through a
launcher's store) and check that the world is devices x data_parallel processes."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from bitpipe_fx.errors import ConfigError, PipelineRuntimeError


def init_group(backend: str, timeout: float, store: dist.Store | None = None, rank: int = -1,
               world_size: int = -1) -> None:
    """Join the process group: through ``store`` as ``rank`` of ``world_size``, else from the environment."""
    if store is None:
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except (dist.DistError, RuntimeError, OSError, ValueError) as exc:
            raise rendezvous_error(exc, timeout) from exc
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))


def join_from_env(timeout: float) -> bool:
    """True when torch.distributed runs more than one process, joining it first under torchrun's environment."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        init_group("nccl" if torch.cuda.is_available() else "gloo", timeout)
    return dist.is_initialized() and dist.get_world_size() > 1


def check_world(devices: int, data_parallel: int) -> tuple[int, int]:
    """(rank, world size), or ConfigError when the world is not devices x data_parallel processes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != devices * data_parallel:
        raise ConfigError(
            f"torch.distributed has world size {world} but devices x data_parallel = {devices} x {data_parallel} "
            f"= {devices * data_parallel}; launch that many processes (torchrun --nproc-per-node "
            f"{devices * data_parallel}) or change devices/data_parallel"
        )
    return rank, world


def rendezvous_error(exc: BaseException, timeout: float) -> PipelineRuntimeError:
    """One clear line for a failed join under torchrun's environment: a peer that never came, a port in use, or
    an address that cannot be reached, with the values of MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE."""
    env = os.environ
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    who = f"rank {env.get('RANK', '?')} of WORLD_SIZE {env.get('WORLD_SIZE', '?')}"
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "address already in use" in lowered or "eaddrinuse" in lowered:
        return PipelineRuntimeError(
            f"cannot join the process group as {who}: MASTER_PORT {env.get('MASTER_PORT')} at {where} is already in "
            "use by another program; pick a free port (torchrun --master-port P, or MASTER_PORT=P)")
    if "timed out" in lowered or "timeout" in lowered:
        return PipelineRuntimeError(
            f"the other processes did not join {who} at {where} within --timeout {timeout:g} s ({text[:160]}); start "
            f"all WORLD_SIZE processes with the same MASTER_ADDR/MASTER_PORT (torchrun --nproc-per-node N), or fix "
            "WORLD_SIZE")
    return PipelineRuntimeError(
        f"cannot join the process group at {where} as {who}: {type(exc).__name__}: {text[:200]}; check MASTER_ADDR, "
        "MASTER_PORT, RANK and WORLD_SIZE")
