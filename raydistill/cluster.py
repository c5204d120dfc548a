"""Connecting to Ray: a cluster by address, or a local instance started on the spot."""

from __future__ import annotations

import logging
import os

AUTH_MODE = "RAY_AUTH_MODE"


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             dashboard: bool = False) -> None:
    """Connect to `address` (e.g. `auto`, `ray://host:10001`) or to $RAY_ADDRESS (set inside a
    submitted Ray job), else start Ray locally, with a dashboard only if asked (Ray Train's
    controller polls the state API, which the dashboard serves). A process that already
    initialised Ray keeps its connection.

    A local instance serves only this run, on loopback, so it starts without Ray's token
    authentication (unless RAY_AUTH_MODE says otherwise): with it, Ray writes a token into the
    user's home and warns on every first run that it did."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        os.environ.setdefault(AUTH_MODE, "disabled")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 logging_level=logging.WARNING)
