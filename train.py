"""Train from a YAML config: `python train.py CONFIG.yaml [key.path=value ...]` (the same as `longctx train`).

    python train.py configs/quickstart.yaml
    torchrun --nproc_per_node 2 train.py configs/quickstart.yaml train.deepspeed=configs/deepspeed/zero2.json
"""

import sys

from longctx.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
