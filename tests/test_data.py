"""User data through the npz source: shapes, ranges, labels, conversions and one-line errors."""

import os

import numpy as np
import pytest
import torch

from raydistill.cli import main
from raydistill.config import ConfigError, DataConfig
from raydistill.data import load_images
from raydistill.models import load_checkpoint, load_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def npz(tmp_path, name="data.npz", **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


def digits_npz(tmp_path):
    """The sklearn digits as a user would export them: uint8 [N, 8, 8] and int labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * 255 / 16).astype(np.uint8)
    return npz(tmp_path, images=images, labels=bunch.target)


def test_uint8_gray_with_labels(tmp_path):
    path = digits_npz(tmp_path)
    split = load_images(DataConfig(source="npz", path=path, resolution=16, holdout_fraction=0.2))
    assert split.train.images.shape[1:] == (1, 16, 16) and split.num_classes == 10
    assert len(split.train) + len(split.test) == 1797
    assert split.train.images.min() == -1.0 and 0.9 < split.train.images.max() <= 1.0
    assert torch.bincount(split.test.labels, minlength=10).min() >= 30      # stratified


@pytest.mark.parametrize("low", [0.0, -1.0])
def test_float_rgb_non_square_crop_resize_and_channels(tmp_path, low):
    rng = np.random.default_rng(0)
    images = rng.uniform(low, 1.0, size=(12, 3, 20, 28)).astype(np.float32)
    images[:, :, :, :4] = low            # columns the center crop removes
    path = npz(tmp_path, images=images)
    split = load_images(DataConfig(source="npz", path=path, resolution=8, holdout_fraction=0.25))
    x = torch.cat([split.train.images, split.test.images])
    assert x.shape == (12, 3, 8, 8) and split.num_classes == 1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.mean()) > -0.5
    gray = load_images(DataConfig(source="npz", path=path, resolution=8, channels=1))
    assert gray.train.images.shape[1] == 1
    exact = npz(tmp_path, "exact.npz", images=images[:, :, :16, :16])
    same = load_images(DataConfig(source="npz", path=exact, resolution=16, resize=False,
                                  holdout_fraction=0.25))
    stored = torch.from_numpy(images[:, :, :16, :16])
    expected = stored * 2 - 1 if low == 0 else stored          # [0, 1] is rescaled, [-1, 1] kept
    got = torch.cat([same.train.images, same.test.images])
    order = lambda x: x[x.flatten(1).sum(1).argsort()]        # noqa: E731  (the split shuffles)
    torch.testing.assert_close(order(got), order(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arrays, message", [
    ({"pixels": np.zeros((4, 8, 8), np.uint8)}, "has no 'images' array (found ['pixels'])"),
    ({"images": np.zeros((4, 2, 8, 8), np.uint8)}, "'images' must be [N,H,W] or [N,C,H,W]"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)},
     "'labels' must be 4 integers"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.array([0, 1, -2, 0])},
     "label of sample 2 is -2"),
    ({"images": np.full((4, 8, 8), 3.0, np.float32)}, "float images must lie in [0, 1] or [-1, 1]"),
    ({"images": np.array([[[0.0] * 8] * 8, [[np.nan] * 8] * 8], np.float32)},
     "sample 1 has non-finite values"),
])
def test_bad_npz_is_a_one_line_error_naming_the_file(tmp_path, arrays, message):
    path = npz(tmp_path, **arrays)
    with pytest.raises(ConfigError) as err:
        load_images(DataConfig(source="npz", path=path, resolution=8))
    assert str(err.value).startswith(path) and message in str(err.value)


def test_unreadable_file_and_sizes_without_resize(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="junk.npz: not a readable .npz"):
        load_images(DataConfig(source="npz", path=str(junk)))
    path = npz(tmp_path, images=np.zeros((4, 10, 10), np.uint8))
    with pytest.raises(ConfigError, match="images are 10x10, data.resolution is 16"):
        load_images(DataConfig(source="npz", path=path, resolution=16, resize=False))


def test_teacher_and_classifier_on_an_npz(tmp_path, capsys):
    """The form users try first: `teacher ... data.path=FILE.npz`; classes and shape from the data."""
    path = digits_npz(tmp_path)
    teacher = str(tmp_path / "teacher")
    assert main(["teacher", "--config", f"{ROOT}/configs/smoke/teacher_npz.yaml",
                 f"data.path={path}", "--out", teacher, "--quiet"]) == 0
    config = load_checkpoint(teacher).config.unet
    assert (config.in_channels, config.resolution, config.num_classes) == (1, 16, 10)
    classifier = str(tmp_path / "classifier")
    assert main(["classifier", "--config", f"{ROOT}/configs/smoke/classifier.yaml",
                 "data.source=npz", f"data.path={path}", "steps=300", "--out", classifier,
                 "--quiet"]) == 0
    _, meta = load_classifier(classifier)
    print(f"classifier on the npz digits: held-out accuracy {meta['test_accuracy']:.1%}")
    assert meta["test_accuracy"] >= 0.9
    capsys.readouterr()
    assert main(["teacher", "--config", f"{ROOT}/configs/smoke/teacher_npz.yaml",
                 "--out", str(tmp_path / "t2"), "--quiet"]) == 2
    assert "data.path: is required for source npz" in capsys.readouterr().err


def write_png_folder(root, *, sizes=((12, 12),), classes=("cat", "dog"), per_class=4, rgb=True):
    """An ImageFolder tree of small PNGs: class c's images are bright in channel c % 3."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            pixels[..., label % 3] = 250
            image = Image.fromarray(pixels) if rgb else Image.fromarray(pixels[..., label % 3])
            image.save(root / name / f"{i:03d}.png")
    return str(root)


def test_folder_source_labels_sizes_and_channels(tmp_path):
    path = write_png_folder(tmp_path / "pets", sizes=((12, 12), (20, 16)))
    split = load_images(DataConfig(source="folder", path=path, resolution=8, holdout_fraction=0.25))
    x = torch.cat([split.train.images, split.test.images])
    y = torch.cat([split.train.labels, split.test.labels])
    assert x.shape == (8, 3, 8, 8) and split.num_classes == 2 and sorted(y.tolist()) == [0] * 4 + [1] * 4
    for label in (0, 1):              # the class's bright channel survives scaling and resizing
        assert float(x[y == label][:, label].mean()) > 0.8 > float(x[y == label][:, 1 - label].mean())
    flat = tmp_path / "flat"
    flat.mkdir()
    for file in sorted(os.listdir(tmp_path / "pets" / "cat")):
        os.link(tmp_path / "pets" / "cat" / file, flat / file)
    unlabelled = load_images(DataConfig(source="folder", path=str(flat), resolution=8,
                                        channels=1, holdout_fraction=0.25))
    assert unlabelled.num_classes == 1 and unlabelled.train.images.shape[1] == 1


def test_folder_errors_name_the_file(tmp_path):
    path = write_png_folder(tmp_path / "pets", sizes=((12, 12), (20, 16)))
    with pytest.raises(ConfigError, match=r"001.png: images are 20x16, data.resolution is 12"):
        load_images(DataConfig(source="folder", path=path, resolution=12, resize=False))
    broken = tmp_path / "pets" / "dog" / "002.png"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(ConfigError, match=r"dog/002.png: unreadable image"):
        load_images(DataConfig(source="folder", path=path, resolution=8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: holds no images"):
        load_images(DataConfig(source="folder", path=str(tmp_path / "empty")))
    (tmp_path / "pets" / "loose.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="mixes class folders"):
        load_images(DataConfig(source="folder", path=path))


def test_smoke_teacher_on_a_folder(tmp_path):
    path = write_png_folder(tmp_path / "pets", classes=("a", "b", "c"), per_class=6, rgb=False)
    teacher = str(tmp_path / "teacher")
    assert main(["teacher", "--config", f"{ROOT}/configs/smoke/teacher_npz.yaml",
                 "data.source=folder", f"data.path={path}", "optim.steps=20", "--out", teacher,
                 "--quiet"]) == 0
    checkpoint = load_checkpoint(teacher)
    config = checkpoint.config.unet
    assert (config.in_channels, config.resolution, config.num_classes) == (1, 16, 3)
    assert checkpoint.extra["eval_loss_end"] < checkpoint.extra["eval_loss_start"]


def write_image_shards(root, *, shards=2, per_shard=4, label="cls"):
    """LAION-style tars: per key a png, a label (cls or json) and a caption."""
    import io
    import json
    import tarfile

    from PIL import Image

    os.makedirs(root, exist_ok=True)
    for k in range(shards):
        with tarfile.open(root / f"part-{k:04d}.tar", "w") as tar:
            for i in range(per_shard):
                key, cls = f"{k:04d}{i:04d}", (k * per_shard + i) % 3
                pixels = np.full((10, 14, 3), 30, np.uint8)
                pixels[..., cls] = 240
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, format="PNG")
                members = {"png": png.getvalue(), "txt": b"a caption"}
                if label == "cls":
                    members["cls"] = str(cls).encode()
                elif label == "json":
                    members["json"] = json.dumps({"label": cls}).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root)


@pytest.mark.parametrize("label", ["cls", "json"])
def test_webdataset_image_shards(tmp_path, label):
    path = write_image_shards(tmp_path / "shards", label=label)
    split = load_images(DataConfig(source="webdataset", path=path, resolution=8,
                                   holdout_fraction=0.25))
    x = torch.cat([split.train.images, split.test.images])
    y = torch.cat([split.train.labels, split.test.labels])
    assert x.shape == (8, 3, 8, 8) and split.num_classes == 3
    for cls in range(3):
        assert float(x[y == cls][:, cls].mean()) > 0.8
    same = load_images(DataConfig(source="webdataset", path=f"file://{path}", resolution=8,
                                  holdout_fraction=0.25))
    torch.testing.assert_close(same.train.images, split.train.images)
    unlabelled = load_images(DataConfig(source="webdataset",
                                        path=write_image_shards(tmp_path / "u", label=None),
                                        resolution=8, holdout_fraction=0.25))
    assert unlabelled.num_classes == 1


def test_webdataset_errors_name_shard_and_sample(tmp_path):
    path = write_image_shards(tmp_path / "shards")
    shard = tmp_path / "shards" / "part-0001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(ConfigError, match=r"part-0001.tar: unreadable shard"):
        load_images(DataConfig(source="webdataset", path=path, resolution=8))
    path = write_image_shards(tmp_path / "mixed")
    write_image_shards(tmp_path / "mixed-unlabelled", shards=1, label=None)
    os.replace(tmp_path / "mixed-unlabelled" / "part-0000.tar", tmp_path / "mixed" / "zz.tar")
    with pytest.raises(ConfigError, match=r"zz.tar:00000000: has no label while other samples do"):
        load_images(DataConfig(source="webdataset", path=path, resolution=8))
    (tmp_path / "none").mkdir()
    with pytest.raises(ConfigError, match="holds no .tar shards"):
        load_images(DataConfig(source="webdataset", path=str(tmp_path / "none")))


@pytest.mark.parametrize("name, job", [
    ("teacher_npz", "TeacherJob"), ("teacher_folder", "TeacherJob"),
    ("teacher_webdataset", "TeacherJob"), ("classifier_folder", "ClassifierJob"),
])
def test_example_configs_load_once_given_a_path(tmp_path, name, job):
    """Each documented example is a valid config; without data.path it says so by key."""
    from raydistill import config as cfg

    source = {"teacher_npz": "npz"}.get(name, "folder" if "folder" in name else "webdataset")
    path = npz(tmp_path, images=np.zeros((2, 8, 8), np.uint8)) if source == "npz" else str(tmp_path)
    example = f"{ROOT}/configs/examples/{name}.yaml"
    loaded = cfg.load(getattr(cfg, job), example, [f"data.path={path}"])
    assert loaded.data.source == source
    with pytest.raises(ConfigError, match="data.path: is required"):
        cfg.load(getattr(cfg, job), example)
