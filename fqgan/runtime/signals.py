"""Preemption: a scheduler's signal ends a run with a checkpoint at the current step, not with lost work.

SLURM and Kubernetes send SIGTERM before they kill a job (SLURM's ``--signal=USR1@120`` sends SIGUSR1
ahead of time); torchrun forwards SIGTERM and SIGINT to its workers. :class:`StopRequest` turns the signals
into a flag that every rank sees at the same step: each step it launches an asynchronous all-reduce (MAX)
of its own flag over a CPU (gloo) group and reads the previous step's result, which has long arrived. The
loop then saves an atomic checkpoint at that step on every rank and exits with :data:`PREEMPTED_EXIT_CODE`.
A second SIGINT (Ctrl-C twice) stops at once, without the checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .dist import DistInfo
from .errors import UsageError

__all__ = ["DEFAULT_STOP_SIGNALS", "PREEMPTED_EXIT_CODE", "StopRequest", "Stopped", "parse_signals",
           "stop_on_signals"]

DEFAULT_STOP_SIGNALS = "TERM,INT,USR1"
# EX_TEMPFAIL of sysexits.h: "try again later". A requeue script tests for it (a single process exits with
# it; under torchrun the run folder's PREEMPTED file says the same, since torchrun reports its own code).
PREEMPTED_EXIT_CODE = 75


def parse_signals(text: str) -> list[signal.Signals]:
    """``"TERM,INT,USR1"`` (names with or without ``SIG``, or numbers) as signals; ``""``: none."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name = item.upper() if item.upper().startswith("SIG") else "SIG" + item.upper()
        try:
            out.append(signal.Signals(int(item)) if item.isdigit() else signal.Signals[name])
        except (KeyError, ValueError):
            raise UsageError(f"--stop-signals: unknown signal {item!r} (e.g. TERM,INT,USR1)") from None
    return out


class StopRequest:
    """Catches ``signals`` for the lifetime of the run (the previous handlers come back at :meth:`close`).

    :meth:`poll` is called once per step on every rank, in step; it returns True at the first step at which
    some rank had been signalled, the same step on every rank.
    """

    def __init__(self, signals: Sequence[signal.Signals], info: DistInfo) -> None:
        self.info = info
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._work = None
        self._group = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        if info.distributed:
            # A CPU group for this flag, so reading it never waits on a GPU stream.
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        try:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a test runner's worker thread): no handlers
            self.close()

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.requested is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.requested is None and self.info.is_main:
            print(f"\n{sig.name}: finishing this step, then saving a checkpoint (send SIGINT again to stop at "
                  "once)", file=sys.stderr, flush=True)
        self.requested = self.requested or sig

    def poll(self) -> bool:
        """True when the run should stop after the current step (collective: every rank, every step)."""
        mine = int(self.requested is not None)
        if not self.info.distributed:
            return bool(mine)
        agreed = False
        if self._work is not None:
            self._work.wait()  # launched a step ago: already complete
            agreed = bool(self._flag.item())
        self._flag = torch.tensor([mine], dtype=torch.int32)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def close(self) -> None:
        """Restore the previous signal handlers; finish the pending all-reduce."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Stopped(KeyboardInterrupt):
    """A command's work ended by a signal, the message saying what was kept and how to go on; the CLI prints it
    as one line and exits with :attr:`exit_code` (:data:`PREEMPTED_EXIT_CODE` for a scheduler's signal, 130 for
    Ctrl-C)."""

    def __init__(self, message: str, sig: signal.Signals = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signal = sig
        self.exit_code = 130 if sig == signal.SIGINT else PREEMPTED_EXIT_CODE


class _Signalled(KeyboardInterrupt):
    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(sig.name)
        self.signal = sig


@contextlib.contextmanager
def stop_on_signals(what: Callable[[], str],
                    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)) -> Iterator[None]:
    """For work with no step to finish (sampling shards, an evaluation): in the block, ``signals`` interrupt at
    once as Ctrl-C does, and either ends the block with :class:`Stopped` ``"stopped by SIGTERM: " + what()``
    (``what`` is called then: it says what was kept and how to go on). Outside the main thread (no handlers
    there) only Ctrl-C is turned into :class:`Stopped`."""
    def handle(signum: int, frame) -> None:
        raise _Signalled(signal.Signals(signum))

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handle) for sig in signals} if main else {}
    try:
        yield
    except KeyboardInterrupt as exc:
        if isinstance(exc, Stopped):
            raise
        sig = exc.signal if isinstance(exc, _Signalled) else signal.SIGINT
        raise Stopped(f"stopped by {sig.name}: {what()}", sig) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
