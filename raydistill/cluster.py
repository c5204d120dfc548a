"""Connecting to Ray: a cluster by address, or a local instance started on the spot."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

AUTH_MODE, ADDRESS, GCS_PORT = "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT"


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
    address = address or os.environ.get(ADDRESS)
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    os.environ.setdefault(AUTH_MODE, "disabled")
    with _own_address():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 logging_level=logging.WARNING)


@contextlib.contextmanager
def _own_address():
    """While a local instance starts: its GCS on a free port chosen here, and that address in
    RAY_ADDRESS for the processes it starts. Ray's own components that look for "the" instance
    (Ray Train's placement-group cleaner asks the state API) then find this one, not fail on
    another run's or a user's `ray start` on the same machine. This process's environment is
    restored after (a later local start must not connect to this instance once it is shut down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = {name: os.environ.get(name) for name in (GCS_PORT, ADDRESS)}
    os.environ[GCS_PORT], os.environ[ADDRESS] = str(port), f"127.0.0.1:{port}"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
