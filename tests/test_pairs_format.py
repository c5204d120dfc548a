"""Shards, storage, manifest and generation without Ray."""

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch

from raydistill.config import ConfigError, PairsJob, from_dict
from raydistill.diffusion import CFG, cfg_x, sample
from raydistill.diffusion.progressive import jump_target, stochastic_sample
from raydistill.models.checkpoint import load_teacher
from raydistill.pairs.format import (
    SCHEMAS,
    Layout,
    ShardError,
    decode_shard,
    encode_shard,
    load_npy,
)
from raydistill.pairs.generate import ShardMaker
from raydistill.pairs.manifest import Manifest, claim_location
from raydistill.pairs.pool import plan_pairs
from raydistill.storage import Location

ANALYTIC = {"num_classes": 3, "components_per_class": 2, "dim": 8, "shape": [2, 2, 2], "seed": 1}


def job(mode="ode", **overrides) -> PairsJob:
    data = {"mode": mode, "teacher": {"analytic": ANALYTIC}, "samples_per_shard": 12,
            "batch_size": 5, "solver": {"solver": "ddim", "steps": 8},
            "guidance": {"w_min": 0.0, "w_max": 3.0}, "data": {"source": "mixture"}}
    if mode == "progressive":
        data["student_steps"] = 4
    data.update(overrides)
    return from_dict(PairsJob, data)


LAYOUTS = [Layout(mode, text) for mode in SCHEMAS for text in (False, True)]


def columns(layout, n=3):
    arrays, fields = layout.arrays, layout.fields
    out = {name: np.random.default_rng(0).normal(size=(n, 2, 3)).astype(np.float32)
           for name in arrays}
    for name in fields:
        out[name] = np.arange(n) * (1.5 if name in ("w", "t") else 1)
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_encode_decode_round_trip_and_determinism(layout):
    cols = columns(layout)
    data = encode_shard(7, layout, cols)
    assert data == encode_shard(7, layout, cols)          # fixed tar metadata: same bytes
    samples = list(decode_shard(data, "x.tar", layout))
    assert [s["__key__"] for s in samples] == ["s000007_00000", "s000007_00001", "s000007_00002"]
    for i, s in enumerate(samples):
        for name in layout.arrays:
            np.testing.assert_array_equal(s[name], cols[name][i])
        for name in layout.fields:
            assert s[name] == cols[name][i]
    assert ("encoder_hidden_states" in samples[0]) == layout.text
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert not [m for m in tar if m.name.endswith((".pickle", ".pyd", ".pth"))]


def test_decode_errors_name_the_shard():
    ode, text = Layout("ode"), Layout("ode", text=True)
    data = encode_shard(0, ode, columns(ode))
    for cut in (len(data) // 3 + 100, len(data) // 3 // 512 * 512, len(data) - 1024):
        with pytest.raises(ShardError, match="shard bad.tar: (truncated|unreadable)"):
            list(decode_shard(data[:cut], "bad.tar", ode))
    with pytest.raises(ShardError, match="sample s000000_00001 is incomplete"):
        list(decode_shard(_without(data, "s000000_00001.image.npy"), "bad.tar", ode))
    with pytest.raises(ShardError, match="sample s000000_00000 is incomplete"):
        list(decode_shard(data, "bad.tar", text))        # a text set's sample without embeddings
    with pytest.raises(ShardError, match="unexpected member s000000_00000.encoder_hidden_states"):
        list(decode_shard(encode_shard(0, text, columns(text)), "bad.tar", ode))


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((2, 3, 2))),
    np.float32(1.5), np.zeros((0, 4), np.int64), np.array(["ab", "c"])])
def test_load_npy_reads_what_np_load_reads(array):
    layouts: dict = {}
    for version in ((1, 0), (2, 0), (1, 0)):             # the third read uses the cached header
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(array), version=version)
        raw = buffer.getvalue()
        want = np.load(io.BytesIO(raw), allow_pickle=False)
        got = load_npy(raw, layouts)
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable
        np.testing.assert_array_equal(got, want)
    assert len(layouts) == 2
    with pytest.raises(ValueError, match="bytes for an array"):
        load_npy(raw + b"\0", layouts)


def test_load_npy_refuses_pickles_and_non_npy():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{}, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects"):
        load_npy(buffer.getvalue(), {})
    with pytest.raises(ValueError, match="not an .npy file"):
        load_npy(b"PK\x03\x04 not numpy at all", {})


def _without(data: bytes, member_name: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            if member.name != member_name:
                dst.addfile(member, src.extractfile(member))
    return out.getvalue()


@pytest.mark.parametrize("uri_kind", ["path", "file", "memory"])
def test_location_atomic_writes(tmp_path, uri_kind):
    uri = {"path": str(tmp_path / "d"), "file": f"file://{tmp_path}/d",
           "memory": f"memory://raydistill-test-{tmp_path.name}/d"}[uri_kind]
    location = Location.parse(uri)
    assert location.list() == []
    location.write_atomic("a.bin", b"abc")
    location.write_atomic("a.bin", b"abcd")
    assert location.read("a.bin") == b"abcd" and location.list() == ["a.bin"]
    assert location.exists("a.bin") and not location.exists("b.bin")


def test_claim_location_refuses_other_runs(tmp_path):
    location = Location.parse(str(tmp_path / "pairs"))
    teacher = load_teacher(job().teacher)
    other = dataclasses.replace(teacher, fingerprint="0" * 64)
    claim_location(location, job(), teacher)
    claim_location(location, job(num_shards=20), teacher)     # growing is fine
    with pytest.raises(ConfigError, match="teacher_fingerprint="):
        claim_location(location, job(), other)
    with pytest.raises(ConfigError, match="mode='ode', this job has mode='guided'"):
        claim_location(location, job("guided"), teacher)
    progressive = Location.parse(str(tmp_path / "progressive"))
    claim_location(progressive, job("progressive"), teacher)
    with pytest.raises(ConfigError, match="stochastic=False, this job has stochastic=True"):
        claim_location(progressive, job("progressive", stochastic=True), teacher)
    stray = Location.parse(str(tmp_path / "stray"))
    stray.write_atomic("shard-000000.tar", b"x")
    with pytest.raises(ConfigError, match="no pairs.json"):
        claim_location(stray, job(), teacher)
    assert len(Manifest.read(location)) == 0


def test_a_plan_that_may_replace_empties_a_location_of_another_runs_set(tmp_path):
    """`plan_pairs(replace=True)` (a pipeline's pair stage, eval's sample sets) deletes another
    run's set and says how it differed; the same run's set it keeps, and without `replace` the
    other run is refused."""
    out = str(tmp_path / "pairs")
    location = Location.parse(out)
    plan_pairs(job(), out)
    location.write_atomic("shard-000000.tar", b"x")
    assert plan_pairs(job(), out, replace=True).replaced is None
    assert location.exists("shard-000000.tar")
    with pytest.raises(ConfigError, match="holds shards with solver="):
        plan_pairs(job(solver={"solver": "ddim", "steps": 4}), out)
    plan = plan_pairs(job(solver={"solver": "ddim", "steps": 4}), out, replace=True)
    assert plan.replaced.startswith("solver=") and "'steps': 8" in plan.replaced
    assert not location.exists("shard-000000.tar") and plan.todo == list(range(job().num_shards))


def test_fingerprint_pin():
    teacher = load_teacher(job().teacher)
    load_teacher(job(teacher={"analytic": ANALYTIC, "fingerprint": teacher.fingerprint[:12]}).teacher)
    with pytest.raises(ConfigError, match="teacher.fingerprint"):
        load_teacher(job(teacher={"analytic": ANALYTIC, "fingerprint": "deadbeef"}).teacher)


def test_shards_regenerate_identically_and_independently_of_batching():
    teacher = load_teacher(job().teacher)
    a = ShardMaker(job(), teacher).make(3)
    b = ShardMaker(job(batch_size=12), teacher).make(3)
    ode = Layout("ode")
    assert encode_shard(3, ode, a) == encode_shard(3, ode, ShardMaker(job(), teacher).make(3))
    np.testing.assert_allclose(a["image"], b["image"], rtol=0, atol=1e-6)
    assert len(set(a["seed"].tolist())) == 12
    other = ShardMaker(job(), teacher).make(4)
    assert not np.allclose(a["noise"], other["noise"])


def test_stochastic_ode_pairs_draw_each_samples_renoise_from_its_own_seed():
    """ode pairs with stochastic: true are Meng et al.'s sampler from the stored noise, its re-noise
    drawn from the sample's own seed (after c, w and noise): the same images at any batch size,
    and not the deterministic ones."""
    spec = job(stochastic=True, solver={"steps": 4})
    teacher = load_teacher(spec.teacher)
    cols = {k: torch.as_tensor(v) for k, v in ShardMaker(spec, teacher).make(2).items()}
    want = []
    for i in range(12):
        g = torch.Generator().manual_seed(int(cols["seed"][i]))
        c, w = torch.randint(0, 3, (1,), generator=g), 3.0 * torch.rand((1,), generator=g)
        noise = torch.randn(1, 2, 2, 2, generator=g)
        assert int(c) == int(cols["c"][i]) and torch.equal(noise, cols["noise"][i:i + 1])
        xi = torch.randn(1, 3, 2, 2, 2, generator=g)
        with torch.no_grad():
            want.append(stochastic_sample(teacher.w_denoiser, noise, {"c": c, "w": w},
                                          teacher.denoiser.schedule, steps=4, xi=xi)[0])
    torch.testing.assert_close(cols["image"], torch.stack(want).float(), rtol=0, atol=1e-5)
    rebatched = ShardMaker(dataclasses.replace(spec, batch_size=12), teacher).make(2)
    np.testing.assert_allclose(rebatched["image"], cols["image"], rtol=0, atol=1e-6)
    deterministic = ShardMaker(job(solver={"steps": 4}), teacher).make(2)
    assert np.abs(deterministic["image"] - cols["image"].numpy()).max() > 0.1
    with pytest.raises(ConfigError, match="stochastic: applies to ode pairs and progressive"):
        job("guided", stochastic=True)


@pytest.mark.parametrize("mode, overrides", [("ode", {}), ("guided", {}), ("progressive", {}),
                                             ("progressive", {"stochastic": True})])
def test_each_mode_matches_the_diffusion_functions(mode, overrides):
    """ode = the solver on the stored noise; guided = x_hat_w; progressive = the target of one
    1/N jump (two teacher steps), or for the stochastic sampler of a 2/N jump (four teacher
    steps) except from t = 1/N."""
    spec = job(mode, **overrides)
    teacher = load_teacher(spec.teacher)
    maker = ShardMaker(spec, teacher)
    cols = {k: torch.as_tensor(v) for k, v in maker.make(0).items()}
    cond = {"c": cols["c"]}
    denoiser, schedule = teacher.denoiser, teacher.denoiser.schedule
    with torch.no_grad():
        if mode == "ode":
            want = torch.stack([
                sample(denoiser, cols["noise"][i:i + 1], {"c": cols["c"][i:i + 1]}, schedule,
                       steps=8, solver="ddim", w=float(cols["w"][i]))[0]
                for i in range(12)])
            got = cols["image"]
        else:
            z_t, t, w = cols["z_t"], cols["t"].float(), cols["w"].float()
            if mode == "guided":
                want = cfg_x(denoiser, z_t, t, cond, w)
            else:
                assert set((t * 4).round().tolist()) <= {1.0, 2.0, 3.0, 4.0}
                want = torch.stack([
                    jump_target(CFG(denoiser), z_t[k:k + 1], t[k:k + 1], t[k:k + 1] - jump,
                                {"c": cond["c"][k:k + 1], "w": w[k:k + 1]}, schedule,
                                teacher_steps=round(jump * 8))[0]
                    for k in range(12)
                    for jump in [2 / 4 if spec.stochastic and t[k] > 0.3 else 1 / 4]])
            got = cols["target"]
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
