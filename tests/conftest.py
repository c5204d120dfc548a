import os
import re

# Ray Data re-requests cluster resources for a running dataset at most every 10 s by default; tests
# that add a node mid-run would otherwise need minute-long runs. Must be set before Ray Data loads.
os.environ.setdefault("RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS", "1")
# Keep Ray, Ray Train and gloo on loopback and skip token auth for the local clusters tests start,
# so `make test` and a bare `pytest` behave like .ci/run.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest
import torch

from raydistill.config import ModelConfig, UNetConfig
from raydistill.diffusion import CosineSchedule
from raydistill.models import AnalyticTeacher, GaussianMixture, build_network, save_checkpoint


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def schedule():
    return CosineSchedule()


@pytest.fixture(scope="session")
def mixture():
    """3 classes x 2 components in 4 dimensions, float64: the oracle for the math tests."""
    return GaussianMixture.random(num_classes=3, components_per_class=2, dim=4, seed=0)


@pytest.fixture(scope="session")
def teacher(mixture, schedule):
    return AnalyticTeacher(mixture, schedule)


@pytest.fixture
def batch(mixture):
    """Noise and class labels for 128 samples."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(128, mixture.dim, generator=g, dtype=torch.float64)
    return noise, {"c": torch.randint(0, mixture.num_classes, (128,), generator=g)}


@pytest.fixture(scope="session")
def slow_teacher(tmp_path_factory):
    """A small random UNet teacher whose shards take about a second each: long enough to kill a
    worker mid-shard or add and remove nodes mid-run."""
    config = ModelConfig(unet=UNetConfig(base_channels=16, resolution=8, num_classes=3,
                                         attention_resolutions=[]))
    path = str(tmp_path_factory.mktemp("unet") / "teacher")
    save_checkpoint(path, build_network(config), config)
    return path


@pytest.fixture
def single_process_group(tmp_path, monkeypatch):
    """A world of one, as a launcher would set it up (DeepSpeed reads the rank variables)."""
    import torch.distributed as dist

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()      # also drops DeepSpeed's cached group references


# A line a Ray worker or Ray's own processes logged, which the driver forwards to its stderr
# whenever it arrives: "(pid=gcs_server) ...", "(RayTrainWorker pid=12) ...", maybe coloured.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((\S+ )?pid=")


@pytest.fixture
def cli_stderr(capsys):
    """What a command printed to stderr, without the lines a Ray instance an earlier test started
    forwards there at any moment: the command's own lines, stripped."""
    def read() -> str:
        lines = capsys.readouterr().err.strip().splitlines()
        return "\n".join(line for line in lines if not _RAY_FORWARDED.match(line))
    return read
