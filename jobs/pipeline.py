"""Ray job entrypoint for the whole pipeline: the same code path as `raydistill run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config configs/smoke/pipeline.yaml --out /shared/runs/pipeline

Inside a submitted job Ray joins the job's cluster ($RAY_ADDRESS); elsewhere `--address` names a
cluster, and without it Ray starts locally. On a multi-node cluster `--out` must be on storage every
node reads (a shared filesystem). Re-submitting the same job continues it: finished stages are
skipped by their lineage.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
