"""Run a command and report its own peak RSS and CPU time: `measure.py OUT.json CMD...`.

Why a separate process: on Linux a child's ru_maxrss counts the memory of the process
it was forked from until it execs, and Python's subprocess starts children from the
(large) benchmark process. Started from here, a small process, the command's peak RSS
is its own.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    with open(out, "w") as f:
        json.dump({"maxrss_bytes": usage.ru_maxrss * scale, "user_s": usage.ru_utime,
                   "sys_s": usage.ru_stime}, f)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
