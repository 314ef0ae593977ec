"""One rank of the two-process loader test (tests/test_loader.py), run under accelerate launch.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/loader_ddp_worker.py \\
    --out result.json --batches 7 --batch-size 2 --workers 2 SHARD [SHARD ...]

Iterates its rank's training loader like a DDP training loop would (a collective per step,
so unequal batch counts hang instead of finishing), then gathers every rank's batch count
and sample keys; rank 0 writes them as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object

from ssd.data.loader import train_loader
from ssd.data.transforms import AugmentConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)

    # A rank left waiting in a collective gives up after this long instead of hanging forever.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
    loader = train_loader(
        args.shards,
        AugmentConfig(),
        image_size=args.image_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=0,
        epoch=0,
        batches_per_epoch=args.batches,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    keys: list[str] = []
    batches = steps = 0
    for batch in loader:
        batch = batch.to(accelerator.device)
        batches += 1
        keys.extend(batch.keys)
        # Stands in for DDP's gradient all-reduce: every rank must reach it the same number of times.
        steps = int(accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum").item() > 0) + steps
    counts = accelerator.gather(torch.tensor([batches], device=accelerator.device)).tolist()
    all_keys = gather_object([keys])
    if accelerator.is_main_process:
        result = {"world_size": accelerator.num_processes, "batches": counts, "steps": steps, "keys": all_keys}
        Path(args.out).write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
