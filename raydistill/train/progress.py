"""Training progress on the driver's terminal: one bar per run, fed by rank 0.

Rank 0 posts each logged step's metrics to a small Ray actor that keeps the latest (a call it
does not wait for: the loop never waits on the driver); `StepBar` on the driver polls it on a
thread and draws one tqdm bar with the round, loss, samples/s and the ETA. On a cluster the driver
sees the workers only through Ray, so this works wherever the job runs.
"""

from __future__ import annotations

import threading
from typing import Any

from tqdm import tqdm

POLL_S = 0.5


def step_postfix(metrics: dict[str, Any]) -> str:
    """What the bar shows beside the step count: the loss, or each phase's (e.g. DMD's
    `fake_score 0.41  generator 0.12`)."""
    phases = {key.removesuffix("/loss"): value for key, value in metrics.items()
              if key.endswith("/loss")}
    losses = "  ".join(f"{name} {value:.4g}" for name, value in phases.items()) if phases \
        else f"loss {metrics['loss']:.4g}"
    rate = metrics["samples_per_s"]
    return (f"{metrics['round']}  {losses}  {rate:.{1 if rate < 10 else 0}f} samples/s  data "
            f"wait {metrics['data_wait']:.0%}")


class Latest:
    """Holds the last metrics posted (a Ray actor on the driver's node, no CPU)."""

    def __init__(self):
        self.metrics = None

    def post(self, metrics: dict[str, Any]) -> None:
        self.metrics = metrics

    def get(self) -> dict[str, Any] | None:
        return self.metrics


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
            import ray

            self.channel = ray.remote(num_cpus=0)(Latest).remote()
            self._thread = threading.Thread(target=self._follow, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._show()                                # the last metrics posted
        if self._bar is not None:
            self._bar.close()
        import ray

        ray.kill(self.channel)

    @staticmethod
    def put(channel, metrics: dict[str, Any]) -> None:
        channel.post.remote(metrics)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            self._show()

    def _show(self) -> None:
        import ray

        metrics = ray.get(self.channel.get.remote())
        if metrics is None:
            return
        if self._bar is None:        # a resumed run starts at its restored step
            self._bar = tqdm(total=metrics["total"], initial=metrics["start"],
                             desc=self.desc, unit="step", mininterval=1.0)
        self._bar.update(metrics["step"] - self._bar.n)
        self._bar.set_postfix_str(step_postfix(metrics), refresh=False)
