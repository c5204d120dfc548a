"""Training progress on the driver's terminal: one bar per run, fed by rank 0.

Rank 0 puts each logged step's metrics on a Ray queue (never blocking: a full queue drops the
update, the next one carries the totals); `StepBar` on the driver reads them on a thread and draws
one tqdm bar with the round, loss, samples/s and the ETA. On a cluster the driver sees the workers
only through Ray, so this works wherever the job runs.
"""

from __future__ import annotations

import threading
from typing import Any

from tqdm import tqdm

QUEUE_SIZE = 64


def step_postfix(metrics: dict[str, Any]) -> str:
    """What the bar shows beside the step count."""
    return (f"{metrics['round']}  loss {metrics['loss']:.4g}  {metrics['samples_per_s']:.0f} "
            f"samples/s  data wait {metrics['data_wait']:.0%}")


class StepBar:
    """`with StepBar(desc) as bar:` run the trainer with `bar.channel` in its config; rank 0
    calls `StepBar.put(channel, metrics)` with the metrics, the run's total steps ("total") and
    the step its attempt started from ("start")."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled = desc, enabled
        self.channel = None
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StepBar:
        if self.enabled:
            from ray.util.queue import Queue

            self.channel = Queue(maxsize=QUEUE_SIZE, actor_options={"num_cpus": 0})
            self._thread = threading.Thread(target=self._follow, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if self._bar is not None:
            self._bar.close()
        self.channel.shutdown()

    @staticmethod
    def put(channel, metrics: dict[str, Any]) -> None:
        from ray.util.queue import Full

        try:
            channel.put_nowait(metrics)
        except Full:
            pass

    def _follow(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                metrics = self.channel.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            if self._bar is None:        # a resumed run starts at its restored step
                self._bar = tqdm(total=metrics["total"], initial=metrics["start"],
                                 desc=self.desc, unit="step", mininterval=1.0)
            self._bar.update(metrics["step"] - self._bar.n)
            self._bar.set_postfix_str(step_postfix(metrics), refresh=False)
