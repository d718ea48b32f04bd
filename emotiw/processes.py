"""Child processes that never outlive emotiw, and SIGTERM handled the way Ctrl-C is.

Schedulers and `timeout` stop a job with SIGTERM. Python's default is to die on the spot, which
skips cleanup and leaves worker processes and `caffe` children running; `stop_on_sigterm` turns
it into a `Terminated` exception (a KeyboardInterrupt, so the same cleanup runs), and every child
we start calls `die_with_parent`, so that even a SIGKILL of emotiw takes its children along.
"""

import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; `signum` gives the exit status 128 + signum."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def stop_on_sigterm():
    """From now on SIGTERM raises Terminated in the main thread (only the main thread may set it)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def die_with_parent(signum=signal.SIGTERM):
    """Linux: this process gets `signum` when the thread that started it ends (prctl
    PR_SET_PDEATHSIG). For subprocess's preexec_fn and pool initialisers; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
