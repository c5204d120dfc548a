"""Ray job entrypoint for pair generation: the same code path as `raydistill pairs`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/generate_pairs.py --config configs/smoke/pairs.yaml --out s3://bucket/pairs

Inside a submitted job Ray joins the job's cluster ($RAY_ADDRESS); elsewhere `--address` names a
cluster, and without it Ray starts locally.
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["pairs", *sys.argv[1:]]))
