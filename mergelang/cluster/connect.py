"""Reaching a Dask scheduler, or starting a cluster on this machine; every way this can
fail is a diagnostic that says what to do."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ..diagnostics import error

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT_S = 10
"""How long to try reaching a scheduler before saying it cannot be reached."""
INSTALL_HINT = 'install the cluster extra: pip install "mergelang[cluster]"'


def import_dask() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise error("running on a cluster needs dask and distributed, which are not "
                    "installed", None, hint=INSTALL_HINT) from None


def start_local(workers: int) -> tuple[Any, Client]:
    """A cluster of `workers` processes on this machine (one task at a time each, no
    memory limit of Dask's: --max-memory bounds a task), its logs kept quiet; and a
    client of it."""
    from distributed import Client, LocalCluster

    try:
        local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             memory_limit=0, dashboard_address=":0",
                             silence_logs=logging.ERROR)
    except Exception as exc:
        raise error(f"cannot start a local Dask cluster: {exc}", None) from None
    return local, Client(local, set_as_default=False)


def connect(address: str) -> Client:
    """A client of the scheduler at `address` (or named in the scheduler file
    `address`); a MergeError that says why when it cannot be reached."""
    from distributed import Client

    hint = "start one with `dask scheduler` and pass the address it prints, " \
        "e.g. --scheduler tcp://10.0.0.5:8786, or its --scheduler-file"
    kwargs: dict[str, Any] = {"scheduler_file": address} if os.path.isfile(address) \
        else {"address": address}
    if "address" in kwargs:
        _probe(address, hint)
    class QuietClient(Client):
        """A Client whose failed construction is not reported a second time, as a
        traceback, when the half-made object is collected."""

        def __del__(self) -> None:
            with contextlib.suppress(Exception):
                super().__del__()

    try:
        return QuietClient(**kwargs, timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise error(f"cannot reach the Dask scheduler at {address}: {exc}", None,
                    hint=hint) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise error(f'invalid scheduler address "{address}": {exc}', None, hint=hint) from None


def _probe(address: str, hint: str) -> None:
    """Check a TCP scheduler address answers before Dask retries it for the whole timeout
    (a refused connection is known at once)."""
    import socket

    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme != "tcp":
            return
        host, port = parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise error(f'invalid scheduler address "{address}": {exc}', None, hint=hint) from None
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise error(f"cannot reach the Dask scheduler at {address}: "
                    f"{exc.strerror or exc}", None, hint=hint) from None


def dashboard_link(client: Client) -> str | None:
    """The dashboard's address, when the scheduler runs one (it needs bokeh)."""
    try:
        if "dashboard" not in client.scheduler_info().get("services", {}):
            return None
        return client.dashboard_link
    except Exception:
        return None

