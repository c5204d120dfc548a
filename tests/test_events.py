import threading

import pytest
from event_files import read_scalars

from raydistill.events import EventWriter, scalars


def test_scalars_are_the_curves_of_a_logged_row():
    row = {"step": 4, "round": "train", "loss": 0.5, "generator/loss_dm": 2.0, "nan_skipped": 0,
           "lr": 1e-3, "loop_at": 1.7e9, "set_up_at": 1.7e9, "flag": True, "bad": float("nan")}
    assert scalars(row) == {"loss": 0.5, "generator/loss_dm": 2.0, "nan_skipped": 0.0,
                            "lr": 1e-3}


def test_event_files_round_trip_and_a_resume_purges_replayed_steps(tmp_path):
    """Two writers in one second keep two files; the resumed one's purge drops the first run's
    step 6, which the resumed run has not logged again."""
    first = EventWriter(str(tmp_path))
    for step in (2, 4, 6):
        first.write({"loss": float(step)}, step)
    first.close()
    resumed = EventWriter(str(tmp_path), purge_step=4)
    for step in (4, 8):
        resumed.write({"loss": 10.0 + step}, step)
    resumed.close()
    assert read_scalars(str(tmp_path))["loss"] == {2: 2.0, 4: 14.0, 8: 18.0}
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(KeyError):
        read_scalars(str(tmp_path))["step"]


def test_a_writer_whose_thread_died_does_not_block_the_run(tmp_path):
    """tensorboardX writes from a thread that dies on a write error (a full disk fills while it
    flushes) without telling anyone: logging must not then block the training loop (a full-disk
    run hung this way, its other rank waiting on it). The wrong variant, tensorboardX's default
    queue of 10, blocks at the first row."""
    writer = EventWriter(str(tmp_path))
    writer._writer._get_file_writer().event_writer._worker.stop()     # the thread, gone
    logged = threading.Event()

    def log():
        for step in range(5):
            writer.write({f"metric{i}": float(i) for i in range(20)}, step)
        logged.set()

    threading.Thread(target=log, daemon=True).start()
    assert logged.wait(timeout=20), "logging blocked on the dead writer thread's queue"
