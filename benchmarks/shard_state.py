"""Optimizer-state bytes per rank with and without ``shard_optimizer`` (ZeRO-1, runtime.zero).

The examples' GPT-style model (tied embedding and head) under ScheduleFreeAdamW, float32, two steps each way in
the same gloo processes: per rank, the bytes of every tensor the optimizer keeps (z and v), the size of the
stage's copy group it is divided by, and the second step's loss (after one update) sharded against unsharded.

    python benchmarks/shard_state.py           # ~1 min on 2 CPU cores (three layouts, 4 processes each)
    python benchmarks/shard_state.py --smoke   # tiny model, one layout
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from _common import Column, machine_info, machine_line, markdown_table, parser, write_results

import bitpipe_fx as bp
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.runtime.gradsync import replica_ranks
from bitpipe_fx.runtime.launch import launch

FULL = {"model": {"vocab": 2048, "seq": 128, "dim": 256, "heads": 4, "layers": 8, "micro_batch": 1},
        "layouts": (("bitpipe", 4, 1), ("bitpipe", 2, 2), ("1f1b", 2, 2))}
SMOKE = {"model": {"vocab": 64, "seq": 16, "dim": 32, "heads": 2, "layers": 4, "micro_batch": 1},
         "layouts": (("bitpipe", 2, 2),)}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state on this rank."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def rank_body(model_cfg: dict[str, int], schedule: str, devices: int, dp: int) -> dict[str, Any]:
    """On every rank: two steps unsharded, two sharded; state bytes, losses and the copy-group sizes."""
    torch.set_num_threads(1)
    model, example = gpt(**model_cfg)
    tokens, targets = lm_batch(model_cfg["vocab"], 2 * devices * dp, model_cfg["seq"], seed=1)
    k = dist.get_rank() // devices
    x, y = tokens.tensor_split(dp)[k], targets.tensor_split(dp)[k]
    out: dict[str, Any] = {"rank": dist.get_rank()}
    for shard in (False, True):
        pipe = bp.compile(model, example, lm_loss, schedule=schedule, devices=devices, microbatches=2 * devices,
                          optimizer=lambda ps: bp.optim.ScheduleFreeAdamW(ps, lr=1e-3), data_parallel=dp,
                          shard_optimizer=shard, timeout=120).train()
        pipe.step(x, y)
        out["loss_sharded" if shard else "loss"] = pipe.step(x, y)  # after one update: the sharded one's
        out["bytes_sharded" if shard else "bytes"] = state_bytes(pipe.optimizer)
        place = pipe.program.placement
        out["groups"] = sorted({len(replica_ranks(place, s, dp)) for s in range(pipe.program.stages)
                                if pipe.rank % devices in place.replica_devices(s)})
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cfg = SMOKE if args.smoke else FULL
    info = machine_info()
    rows = []
    for schedule, devices, dp in cfg["layouts"]:
        for r in launch(rank_body, devices * dp, args=(cfg["model"], schedule, devices, dp), timeout=300,
                        join_timeout=900):
            rows.append({"layout": f"{schedule} D={devices} x dp={dp}", "rank": r["rank"],
                         "group": "/".join(map(str, r["groups"])), "state_mib": r["bytes"] / 2**20,
                         "sharded_mib": r["bytes_sharded"] / 2**20, "ratio": r["bytes"] / r["bytes_sharded"],
                         "loss_rel_err": abs(r["loss_sharded"] - r["loss"]) / abs(r["loss"])})
    columns = [Column("layout", "layout"), Column("rank", "rank"), Column("group", "copy group"),
               Column("state_mib", "state MiB", ".2f"), Column("sharded_mib", "sharded MiB", ".2f"),
               Column("ratio", "ratio", ".2f"), Column("loss_rel_err", "loss rel. err", ".1e")]
    m = cfg["model"]
    md = (f"## Sharded optimizer state (measured)\n\n{machine_line(info)}\n\nGPT-style example model: "
          f"{m['layers']} layers, dim {m['dim']}, vocab {m['vocab']}, seq {m['seq']} (tied head), float32, "
          "ScheduleFreeAdamW; two steps each way (loss error: of the second). Copy group = the stage's replica "
          "devices x data-parallel ranks; ratio = unsharded / sharded state bytes on the rank.\n\n"
          f"{markdown_table(rows, columns)}\n")
    write_results(args.out, "shard_state", {"machine": info, "config": cfg, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
