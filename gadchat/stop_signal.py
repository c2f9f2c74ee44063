"""A stop that stops every rank: SIGTERM or SIGINT (a scheduler preempting the job, a user's
``kill`` or Ctrl-C) is noted, not acted on mid-step, and the ranks stop together at the next step
boundary. A rank started by the ``deepspeed`` launcher also watches the launcher: ``kill <pid>`` of
the launcher (which does not pass SIGTERM on to the ranks itself) counts as a stop request.
A second Ctrl-C stops at once (KeyboardInterrupt); a repeated SIGTERM changes nothing.
"""

from __future__ import annotations

import os
import signal

from gadchat import runtime


class StopRequested(RuntimeError):
    """The run stopped at a step boundary on a signal; the message says where and how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


def _launcher_chain() -> list:
    """``[(pid, create_time)]`` of this rank's ``deepspeed`` launcher processes (its parent
    ``deepspeed.launcher.launch`` and that one's parent, the runner), empty when not started by it."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        parent = psutil.Process(os.getppid())
        if not any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            return []
        chain = [parent]
        grandparent = parent.parent()
        if grandparent is not None:
            chain.append(grandparent)
        return [(p.pid, p.create_time()) for p in chain]
    except (psutil.Error, OSError):
        return []


def _gone(pid: int, created: float) -> bool:
    import psutil

    try:
        return psutil.Process(pid).create_time() != created
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


class StopWatch:
    """Installs SIGTERM/SIGINT handlers that only record the request; :meth:`stop_now` tells every
    rank together (one collective) whether to stop at this step boundary."""

    def __init__(self):
        self.signum = 0
        self.launchers = _launcher_chain()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without waiting for the step to end
        # A repeated SIGTERM (a scheduler signals every process, and DeepSpeed's launcher passes it
        # on once more) changes nothing: the step still ends and the checkpoint is still written.
        self.signum = self.signum or signum

    def requested_here(self) -> int:
        """The signal number this rank was asked to stop by (SIGTERM when its launcher is gone), 0 if none."""
        if not self.signum and any(_gone(pid, created) for pid, created in self.launchers):
            self.signum = signal.SIGTERM
        return self.signum

    def stop_now(self) -> int:
        """The signal number when any rank was asked to stop, else 0, on every rank."""
        return runtime.max_over_ranks(self.requested_here())
