"""Train a GPT-style or BERT-style model (or your own MODULE:FACTORY) with any schedule and optimizer.

The same file runs three ways, unchanged:

    python examples/train.py --devices 4 --steps 200            # 4 local processes (bitpipe_fx.runtime.launch)
    torchrun --nproc-per-node 4 examples/train.py --devices 4   # one process per device (GPU when there is one)
    python examples/train.py --devices 4 --local                # every device in this one process

It is `bitpipe-fx train` (see `python examples/train.py --help`): the loop itself is bitpipe_fx/train/trainer.py,
which reads like any training loop written against the public API::

    pipe = bp.compile(model, example_inputs, loss_fn, schedule="bitpipe", devices=4, microbatches=8,
                      optimizer=lambda params: bp.optim.ScheduleFreeAdamW(params, lr=3e-3))
    pipe.train()
    for step in range(1, steps + 1):
        loss = pipe.step(*batches.train(step))
"""

import sys

from bitpipe_fx.train import main

if __name__ == "__main__":
    sys.exit(main())
