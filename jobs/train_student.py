"""Ray job entrypoint for student training: the same code path as `raydistill train`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_student.py --config configs/smoke/guided.yaml --out /shared/runs/guided

Inside a submitted job Ray joins the job's cluster ($RAY_ADDRESS); elsewhere `--address` names a
cluster, and without it Ray starts locally. On a multi-node cluster `--out`, the teacher and the data
must be on storage every node reads (a shared filesystem); `--resume` continues a stopped run.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
