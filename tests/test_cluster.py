"""The local Ray instance a run starts for itself."""

import os
import subprocess
import sys

START = ("from raydistill.cluster import init_ray; init_ray(num_cpus=1); import ray; "
         "print(ray.cluster_resources()['CPU'])")


def test_a_local_instance_starts_without_token_authentication(tmp_path):
    """A user's first run (RAY_AUTH_MODE unset) prints no token-authentication warning and writes
    no token into the user's home; the instance serves only the run, on loopback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", START], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.0"
    assert "Token authentication" not in result.stderr
    assert not (tmp_path / ".ray").exists()
