"""The Ray Data path of every image source gives the same samples as the in-process path."""

import numpy as np
import pytest
import ray
import torch
from test_data import digits_npz, npz, write_image_shards, write_png_folder

from raydistill.config import ConfigError, DataConfig
from raydistill.data.digits import digits_arrays
from raydistill.data.ray_source import image_dataset
from raydistill.data.sources import read_samples


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def through_ray(config: DataConfig) -> dict[str, tuple[np.ndarray, int]]:
    rows = image_dataset(config).take_all()
    by_key = {row["key"]: (row["image"], int(row["label"])) for row in rows}
    assert len(by_key) == len(rows), "every sample exactly once"
    return by_key


def assert_agree(config: DataConfig) -> dict:
    keys, images, labels = read_samples(config)
    labels = np.zeros(len(keys), np.int64) if labels is None else labels
    got = through_ray(config)
    assert sorted(got) == sorted(keys)
    for key, image, label in zip(keys, images, labels):
        np.testing.assert_allclose(got[key][0], image.numpy(), rtol=0, atol=1e-6, err_msg=key)
        assert got[key][1] == label, key
    return got


def test_npz_agrees(tmp_path):
    got = assert_agree(DataConfig(source="npz", path=digits_npz(tmp_path), resolution=16))
    assert len(got) == 1797 and next(iter(got.values()))[0].shape == (1, 16, 16)
    rng = np.random.default_rng(0)
    floats = npz(tmp_path, "rgb.npz", images=rng.uniform(0, 1, (9, 3, 12, 20)).astype(np.float32))
    assert_agree(DataConfig(source="npz", path=floats, resolution=8, channels=1))


def test_digits_agrees_with_the_unsplit_arrays():
    images, labels = digits_arrays(DataConfig(resolution=16))
    got = through_ray(DataConfig(resolution=16))
    assert len(got) == 1797
    for i in (0, 1, 900, 1796):
        np.testing.assert_array_equal(got[f"digits:{i}"][0], images[i].numpy())
        assert got[f"digits:{i}"][1] == labels[i]


def test_folder_agrees(tmp_path):
    path = write_png_folder(tmp_path / "pets", sizes=((12, 12), (20, 16)))
    got = assert_agree(DataConfig(source="folder", path=path, resolution=8, channels=3))
    assert sorted(label for _, label in got.values()) == [0] * 4 + [1] * 4
    assert_agree(DataConfig(source="folder", path=path, resolution=8, channels=1))


@pytest.mark.parametrize("label", ["cls", "json", None])
def test_webdataset_agrees(tmp_path, label):
    path = write_image_shards(tmp_path / "shards", label=label)
    got = assert_agree(DataConfig(source="webdataset", path=path, resolution=8, channels=3))
    assert len(got) == 8


def test_ray_path_errors(tmp_path):
    path = write_png_folder(tmp_path / "pets")
    with pytest.raises(ConfigError, match="data.channels: must be 1 or 3"):
        image_dataset(DataConfig(source="folder", path=path))
    (tmp_path / "pets" / "dog" / "001.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match=r"dog/001.png: unreadable image"):
        image_dataset(DataConfig(source="folder", path=path, channels=3)).take_all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: holds no images"):
        image_dataset(DataConfig(source="folder", path=str(tmp_path / "empty"), channels=3))


def test_batches_stack_for_training(tmp_path):
    path = write_png_folder(tmp_path / "pets", sizes=((12, 12), (20, 16)))
    batch = next(iter(image_dataset(DataConfig(source="folder", path=path, resolution=8, channels=3))
                      .select_columns(["image", "label"]).iter_torch_batches(batch_size=8)))
    assert batch["image"].shape == (8, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
