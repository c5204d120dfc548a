"""Pair generation on a local Ray (2 CPUs, loopback): smoke configs, numbers, resume, verify,
failures of workers and of the driver, and bad input."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import ray
import torch

from raydistill.cli import main
from raydistill.config import PairsJob, load
from raydistill.diffusion import CFG, sample
from raydistill.diffusion.progressive import jump_target
from raydistill.models.checkpoint import load_teacher
from raydistill.pairs.format import shard_name
from raydistill.pairs.manifest import Manifest
from raydistill.pairs.reader import PairReader
from raydistill.storage import Location

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def pairs(*argv):
    return main(["pairs", *argv, "--quiet"])


def read_all(uri):
    return list(PairReader(uri))


@pytest.fixture(scope="module")
def smoke_ode(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ode") / "pairs")
    assert pairs("--config", f"{SMOKE}/pairs.yaml", "--out", out) == 0
    return out


def flip_byte(path: str, offset: int = 3000) -> None:
    """Alter one byte of a file in place: its size stays, only a checksum can tell."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_smoke_ode_pairs_are_the_solver_output(smoke_ode, capsys):
    assert main(["verify", smoke_ode]) == 0
    assert "verify: ok" in capsys.readouterr().out
    job = load(PairsJob, f"{SMOKE}/pairs.yaml")
    teacher = load_teacher(job.teacher)
    samples = read_all(smoke_ode)
    assert len(samples) == job.num_shards * job.samples_per_shard
    noise = torch.stack([s["noise"] for s in samples])
    cond = {"c": torch.stack([s["c"] for s in samples])}
    w = torch.stack([s["w"] for s in samples]).float()
    with torch.no_grad():
        x = sample(CFG(teacher.denoiser), noise, {**cond, "w": w}, teacher.denoiser.schedule,
                   steps=job.solver.steps, solver=job.solver.solver)
    images = torch.stack([s["image"] for s in samples])
    torch.testing.assert_close(images, x, rtol=0, atol=1e-4)
    assert w.min() >= 0 and w.max() <= 2 and w.std() > 0.3      # w ~ U[w_min, w_max]
    assert len({int(s["seed"]) for s in samples}) == len(samples)


def test_smoke_progressive_targets(tmp_path, capsys):
    out = str(tmp_path / "prog")
    assert pairs("--config", f"{SMOKE}/pairs_progressive.yaml", "--out", out) == 0
    job = load(PairsJob, f"{SMOKE}/pairs_progressive.yaml")    # 2 DDIM steps of the CFG teacher
    evaluations = job.num_shards * job.samples_per_shard * 2 * 2
    assert f"pairs/s, {evaluations:,} teacher evaluations)" in capsys.readouterr().out
    assert main(["verify", out]) == 0
    teacher = load_teacher(job.teacher)
    samples = read_all(out)
    z_t = torch.stack([s["z_t"] for s in samples])
    t = torch.stack([s["t"] for s in samples]).float()
    cond = {"c": torch.stack([s["c"] for s in samples]),
            "w": torch.stack([s["w"] for s in samples]).float()}
    assert {int(s["N"]) for s in samples} == {4}
    with torch.no_grad():
        want = jump_target(CFG(teacher.denoiser), z_t, t, t - 1 / 4, cond,
                           teacher.denoiser.schedule, teacher_steps=2)
    torch.testing.assert_close(torch.stack([s["target"] for s in samples]), want, rtol=0, atol=1e-4)


def test_resume_generates_only_missing_shards(smoke_ode, tmp_path, capsys):
    out = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", smoke_ode, out], check=True)
    before = Manifest.read(Location.parse(out)).rows
    assert pairs("--config", f"{SMOKE}/pairs.yaml", "--out", out) == 0
    assert "0 shards generated" in capsys.readouterr().out
    # Lose one shard's record and add two more shards to the run: exactly three are generated.
    manifest = Manifest.read(Location.parse(out))
    del manifest.rows[shard_name(1)]
    manifest.write(Location.parse(out))
    assert pairs("--config", f"{SMOKE}/pairs.yaml", "--out", out, "num_shards=6") == 0
    assert "3 shards generated" in capsys.readouterr().out
    after = Manifest.read(Location.parse(out)).rows
    assert len(after) == 6
    for name in (shard_name(0), shard_name(2), shard_name(3)):
        assert after[name]["created_at"] == before[name]["created_at"]
    assert after[shard_name(1)]["sha256"] == before[shard_name(1)]["sha256"]   # deterministic
    assert main(["verify", out]) == 0


def test_a_rerun_regenerates_shards_that_are_gone_or_resized(smoke_ode, tmp_path, capsys):
    """The manifest is not trusted over the files: a re-run lists the location and regenerates a
    deleted shard and a truncated one from their seeds, byte for byte, saying which; the summary
    counts what is there."""
    out = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", smoke_ode, out], check=True)
    before = Manifest.read(Location.parse(out)).rows
    os.remove(os.path.join(out, shard_name(1)))
    with open(os.path.join(out, shard_name(3)), "r+b") as f:
        f.truncate(1000)
    capsys.readouterr()
    assert pairs("--config", f"{SMOKE}/pairs.yaml", "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"{shard_name(1)} is listed in the manifest but missing: regenerating it" in printed
    assert f"{shard_name(3)} is listed in the manifest but 1000 bytes" in printed
    assert "2 shards generated" in printed and f"{out} holds 4 shards" in printed
    after = Manifest.read(Location.parse(out)).rows
    for name in (shard_name(1), shard_name(3)):
        assert after[name]["sha256"] == before[name]["sha256"]
    assert main(["verify", out]) == 0


def test_verify_repair_regenerates_shards_whose_checksum_fails(smoke_ode, tmp_path, capsys):
    """A shard altered in place keeps its size, so only a checksum finds it: verify --repair
    regenerates it (and a missing one) from the job recorded in pairs.json."""
    out = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", smoke_ode, out], check=True)
    before = Manifest.read(Location.parse(out)).rows
    flip_byte(os.path.join(out, shard_name(2)))
    os.remove(os.path.join(out, shard_name(0)))
    capsys.readouterr()
    assert main(["verify", out]) == 1
    assert main(["verify", out, "--repair", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"shard {shard_name(2)}: sha256 differs" in captured.err
    assert f"regenerated 2 shards from their seeds ({shard_name(0)}, {shard_name(2)})" in \
        captured.out and "verify: ok after repair" in captured.out
    after = Manifest.read(Location.parse(out)).rows
    assert {name: row["sha256"] for name, row in after.items()} == \
        {name: row["sha256"] for name, row in before.items()}


def test_a_pair_set_written_before_pairs_json_had_a_format(tmp_path, capsys):
    """tests/data/pairs-v1 was written by raydistill 5cc79d4: its pairs.json has no format, no
    `stochastic`, no `teacher_steps` and no recorded job. It still verifies and reads, but its
    draws (guided t) and discrete-schedule targets are not today's, so a re-run or a repair, which
    would mix two definitions in one set, is refused by name and leaves it as it was."""
    out = str(tmp_path / "pairs-v1")
    shutil.copytree(os.path.join(ROOT, "tests", "data", "pairs-v1"), out)
    teacher = os.path.join(ROOT, "tests", "data", "unet-v1")
    before = open(os.path.join(out, "pairs.json")).read()
    assert main(["verify", out]) == 0
    assert main(["verify", out, "--repair"]) == 0                 # nothing to repair
    assert len(read_all(out)) == sum(r["count"] for r in
                                     Manifest.read(Location.parse(out)).rows.values())
    capsys.readouterr()
    assert pairs("--config", os.path.join(ROOT, "tests", "data", "pairs-v1.yaml"), "--out", out,
                 f"teacher.checkpoint={teacher}") == 2
    assert "holds a pair set of format 1" in capsys.readouterr().err
    os.remove(os.path.join(out, shard_name(0)))
    assert main(["verify", out, "--repair", "--quiet"]) == 2
    assert "not extended or regenerated" in capsys.readouterr().err
    assert open(os.path.join(out, "pairs.json")).read() == before


def test_verify_and_reader_catch_bad_shards(smoke_ode, tmp_path, capsys):
    out = str(tmp_path / "bad")
    subprocess.run(["cp", "-r", smoke_ode, out], check=True)
    truncated, altered = os.path.join(out, shard_name(0)), os.path.join(out, shard_name(2))
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    flip_byte(altered)
    os.remove(os.path.join(out, shard_name(3)))
    capsys.readouterr()
    assert main(["verify", out]) == 1
    err = capsys.readouterr().err
    assert f"shard {shard_name(0)}: has" in err and "truncated" in err
    assert f"shard {shard_name(2)}: sha256 differs" in err
    assert f"shard {shard_name(3)}: listed in the manifest but missing" in err
    assert shard_name(1) not in err
    from raydistill.pairs.format import ShardError
    with pytest.raises(ShardError, match=shard_name(0)):
        read_all(out)


@pytest.mark.parametrize("overrides, message", [
    (["teacher.fingerprint=abc123"], "teacher.fingerprint: the teacher has fingerprint"),
    (["mode=guided", "data.source=mixture"],
     "holds shards with mode='ode', this job has mode='guided'"),
    (["mode=guided"], "data.resolution: data shape (1, 16, 16) does not match the teacher's"),
    (["teacher.analytic.seed=5"], "holds shards with teacher_fingerprint="),
    (["mode=progressive", "student_steps=3"], "student_steps: must be a power of two"),
    (["solver.steps=0"], "solver.steps: must be positive"),
])
def test_bad_input_fails_before_workers(smoke_ode, tmp_path, capsys, overrides, message):
    out = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", smoke_ode, out], check=True)
    capsys.readouterr()
    assert pairs("--config", f"{SMOKE}/pairs.yaml", "--out", out, *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert len(Manifest.read(Location.parse(out))) == 4


def test_missing_teacher_checkpoint(tmp_path, capsys):
    code = pairs("--config", f"{SMOKE}/pairs.yaml", "--out", str(tmp_path / "o"),
                 "teacher.analytic=null", f"teacher.checkpoint={tmp_path}/nope")
    assert code == 2
    assert "teacher.checkpoint: no such file or directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def unet_args(teacher, out, shards=8):
    return ["--config", f"{SMOKE}/pairs.yaml", "--out", out, "teacher.analytic=null",
            f"teacher.checkpoint={teacher}", f"num_shards={shards}", "samples_per_shard=32",
            "batch_size=32", "solver.steps=24", "workers.max=2"]


def test_a_set_of_two_shards_is_made_by_two_workers(slow_teacher, tmp_path):
    """The pool starts with as many actors as the cluster has room for: on 2 CPUs a 2-shard set
    (the digits eval's sample sets) is drawn by two workers at once, not one after the other."""
    out = str(tmp_path / "pairs")
    deadline = time.time() + 60     # the actors of the tests before release their CPUs
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert pairs("--config", f"{SMOKE}/pairs.yaml", "--out", out, "teacher.analytic=null",
                 f"teacher.checkpoint={slow_teacher}", "num_shards=2", "samples_per_shard=64",
                 "batch_size=64", "solver.steps=96", "workers.max=0") == 0
    rows = Manifest.read(Location.parse(out)).rows
    assert len({row["worker"] for row in rows.values()}) == 2, rows


def test_generate_pairs_from_python_without_ray_started(tmp_path):
    """`generate_pairs` called before Ray is started (the benchmarks do) starts it, as Ray Data
    does: a fresh process, the smoke ode set's first two shards."""
    script = ("from raydistill.config import PairsJob, load\n"
              "from raydistill.pairs.pool import generate_pairs\n"
              f"job = load(PairsJob, {SMOKE + '/pairs.yaml'!r}, ['num_shards=2'])\n"
              f"print('generated', generate_pairs(job, {str(tmp_path / 'pairs')!r}, "
              "progress=False).generated)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "generated 2" in done.stdout, done.stderr[-2000:]


def test_worker_killed_mid_shard_loses_nothing(slow_teacher, tmp_path):
    out = str(tmp_path / "pairs")
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if len(Location.parse(out).list()) >= 4:      # pairs.json, manifest, >= 2 shards
                for proc in psutil.process_iter(["name", "cmdline"]):
                    if "ShardWorker" in " ".join(proc.info["cmdline"] or [proc.info["name"]]):
                        proc.kill()
                        killed.append(proc.pid)
                        break
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    assert pairs(*unet_args(slow_teacher, out)) == 0
    thread.join()
    assert killed, "no worker was killed: the test did not exercise a failure"
    manifest = Manifest.read(Location.parse(out))
    assert sorted(manifest.rows) == [shard_name(k) for k in range(8)]
    assert sorted(n for n in Location.parse(out).list() if n.endswith(".tar")) == \
        [shard_name(k) for k in range(8)]
    assert main(["verify", out]) == 0
    assert len(read_all(out)) == 8 * 32


def test_driver_killed_mid_run_resumes(slow_teacher, tmp_path):
    out = str(tmp_path / "pairs")
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "pairs", "--quiet",
                               *unet_args(slow_teacher, out, shards=10)],
                              start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    location = Location.parse(out)
    deadline = time.time() + 180
    while len(Manifest.read(location)) < 3 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    committed = Manifest.read(location).rows
    assert 3 <= len(committed) < 10, len(committed)
    assert pairs(*unet_args(slow_teacher, out, shards=10)) == 0
    after = Manifest.read(location).rows
    assert len(after) == 10
    for name, row in committed.items():            # nothing committed was redone
        assert after[name]["created_at"] == row["created_at"]
    assert main(["verify", out]) == 0
    np.testing.assert_equal(len(read_all(out)), 10 * 32)


def test_readers_split_ranks_and_agree_with_ray_data(smoke_ode):
    from raydistill.pairs.reader import ray_dataset

    everything = {int(s["seed"]): s for s in read_all(smoke_ode)}
    ranks = [list(PairReader(smoke_ode, rank=r, world_size=2)) for r in range(2)]
    seeds = [{int(s["seed"]) for s in part} for part in ranks]
    assert seeds[0].isdisjoint(seeds[1]) and seeds[0] | seeds[1] == set(everything)
    rows = ray_dataset(smoke_ode).take_all()
    assert len(rows) == len(everything)
    for row in rows:
        expected = everything[int(row["seed"])]
        np.testing.assert_array_equal(row["image"], expected["image"].numpy())
        np.testing.assert_array_equal(row["noise"], expected["noise"].numpy())
        assert int(row["c"]) == int(expected["c"])
    shuffled = [int(s["seed"]) for s in PairReader(smoke_ode, shuffle=True, seed=1)]
    assert sorted(shuffled) == sorted(everything) and shuffled != [int(s["seed"]) for s in
                                                                  read_all(smoke_ode)]


def test_guided_targets_from_the_smoke_digits_teacher(tmp_path):
    """Guided targets on real digits from the trained smoke teacher: x_hat_w(z_t, c), recomputed."""
    from raydistill.diffusion import cfg_x
    from raydistill.models import load_checkpoint

    teacher = str(tmp_path / "teacher")
    assert main(["teacher", "--config", f"{SMOKE}/teacher.yaml", "--out", teacher, "--quiet"]) == 0
    out = str(tmp_path / "guided")
    assert pairs("--config", f"{SMOKE}/pairs.yaml", "--out", out, "mode=guided",
                 "teacher.analytic=null", f"teacher.checkpoint={teacher}", "data.source=digits",
                 "num_shards=2", "samples_per_shard=32", "batch_size=32") == 0
    assert main(["verify", out]) == 0
    samples = read_all(out)
    checkpoint = load_checkpoint(teacher)
    z_t = torch.stack([s["z_t"] for s in samples])
    t = torch.stack([s["t"] for s in samples]).float()
    w = torch.stack([s["w"] for s in samples]).float()
    c = torch.stack([s["c"] for s in samples])
    assert z_t.shape == (64, 1, 16, 16) and set(c.tolist()) <= set(range(10))
    with torch.no_grad():
        want = cfg_x(checkpoint.denoiser, z_t, t, {"c": c}, w)
    torch.testing.assert_close(torch.stack([s["target"] for s in samples]), want,
                               rtol=0, atol=1e-4)
