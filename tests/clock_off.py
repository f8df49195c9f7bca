"""Run a test's subprocess with its wall clock off (Debian's libfaketime): a cluster node whose
clock is behind or ahead of the others, an RTSP server whose sender reports are seconds old.
Only the wall clock moves; the monotonic one (timers, timeouts) stays true. The library is
preloaded into the program itself (not through the `faketime` command, which runs it as a child
that outlives a kill of the command). Standard library only: rtsp_server.py, which imports it,
also runs under Debian's python3."""

from __future__ import annotations

import glob
import os


class FaketimeMissing(RuntimeError):
    pass


def clock_off(command: list[str], offset: str, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """`command` and its environment (default: ours) to run it with the wall clock off by `offset`
    (libfaketime's form: "+120s", "-5s"). FaketimeMissing when Debian's libfaketime is not installed."""
    libraries = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    if not libraries:
        raise FaketimeMissing("libfaketime is not installed (Debian package faketime; tests/install-and-run.sh "
                              "installs it)")
    return command, {**(os.environ if env is None else env), "LD_PRELOAD": libraries[0], "FAKETIME": offset,
                     "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
