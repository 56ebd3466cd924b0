"""A local Ray for a sweep: loopback only, and a clear word when the dashboard cannot start.

Ray 2.60 binds its servers (GCS, raylet, object manager, dashboard and runtime-env agents, every
worker's gRPC port) to all network interfaces (0.0.0.0 / ::) unless the node's address is
127.0.0.1. `ray.init(_node_ip_address="127.0.0.1")` does not get there: `ray.init` replaces a
loopback address by the machine's reachable one. Ray takes 127.0.0.1 as the node address in its
single-machine mode (the default on macOS and Windows), switched on by
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` and read when Ray is first imported. `prefer_loopback` sets
it (unless the user set it) before the sweep imports Ray; every port of the local Ray then
listens on 127.0.0.1, the dashboard's too (`--dashboard-port` moves it). With `--address` (a
cluster) or a `--dashboard-host` other than loopback nothing is changed. The setting concerns
only this process and the Ray it starts; a process that imported Ray earlier (a notebook, the
tests) keeps Ray's default, and the sweep logs a warning.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from dcmtune.sweep.spec import SpecError

__all__ = ["LOOPBACK_HOSTS", "prefer_loopback", "on_loopback", "check_dashboard_extra"]

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_RAY_CONSTANTS = "ray._private.ray_constants"


def prefer_loopback(dashboard_host: str = "127.0.0.1") -> bool:
    """Asks a local Ray started later by this process to listen on 127.0.0.1 only, unless
    `dashboard_host` is not a loopback address. Returns whether it will."""
    if dashboard_host not in LOOPBACK_HOSTS:
        return False
    if _RAY_CONSTANTS not in sys.modules:
        os.environ.setdefault(_SINGLE_MACHINE, "0")
    return on_loopback()


def on_loopback() -> bool:
    """Whether a local Ray started by this process listens on 127.0.0.1 only."""
    constants = sys.modules.get(_RAY_CONSTANTS)
    if constants is not None:  # Ray read the setting when it was imported
        return not getattr(constants, "ENABLE_RAY_CLUSTER", True)
    return os.environ.get(_SINGLE_MACHINE) == "0"


def check_dashboard_extra() -> None:
    """Raises SpecError (one line) when Ray's dashboard packages (`ray[default]`) are missing.

    Imports Ray: call `prefer_loopback` first.
    """
    try:
        importlib.import_module("ray.dashboard.optional_deps")
    except ImportError as e:
        missing = getattr(e, "name", None) or "ray.dashboard"
        raise SpecError(
            f"--dashboard: needs the dashboard extra ({missing} is missing); "
            "install it with pip install 'dcmtune[dashboard]'"
        ) from None
