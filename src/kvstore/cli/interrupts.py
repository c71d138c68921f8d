"""Ctrl-C, SIGTERM and SIGHUP end a program alike: what it started is stopped, then one line.

A program that starts processes (kv-bench and kv-demo: ZooKeeper and nodes; kv-client: its
client processes) or records what it did (kv-client's execution log) runs inside
:class:`Interrupts`. There SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as
Ctrl-C (SIGINT) does, so the same ``finally`` blocks and context managers run: every process
it started is stopped, by PID, through the object that started it, and what it keeps of an
interrupted run is what it keeps on Ctrl-C. (The default action of SIGTERM ended the program
at once, and its children, which run in sessions of their own, went on under PID 1.) The
program then prints one line (:meth:`Interrupts.report`) and exits with
:attr:`Interrupts.exit_status`.

Invariants:

- only the first of these signals interrupts; later ones are ignored until the block is left,
  so the cleanup the first one started is not cut short (each of its steps is bounded: a child
  gets SIGTERM, then SIGKILL after 10 s);
- after :meth:`Interrupts.hold` a signal interrupts nothing: it is only noted (``received``),
  for the program to report once it has written what must not be left half-written;
- a signal that was ignored when the block was entered (``nohup``; SIGINT of a background job)
  stays ignored;
- ``exit_status`` is 128 + the signal's number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), what a
  shell reports for a process that signal ended; SIGINT's if no signal was seen (a
  KeyboardInterrupt raised some other way);
- the handlers in place before are restored when the block is left; outside the main thread
  (where Python sets no handler) nothing changes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from kvstore.cli.args import report_error

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """``with Interrupts(prog) as interrupts: ... except KeyboardInterrupt: return
    interrupts.report(...)``: see the module's docstring."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.received: signal.Signals | None = None
        self._is_held = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            # (None: a handler not set from Python; the default is the nearest to it)
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def hold(self) -> None:
        """From now on a signal is only noted in ``received``, not raised."""
        self._is_held = True

    def _interrupt(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            if not self._is_held:
                raise KeyboardInterrupt(self.received.name)

    @property
    def exit_status(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def report(self, what: str = "") -> int:
        """Print the program's one line on stderr, "PROG: interrupted (SIGTERM): WHAT" (no
        signal named for Ctrl-C), and return the exit status."""
        named = "" if self.received in (None, signal.SIGINT) else f" ({self.received.name})"
        report_error(self.prog, f"interrupted{named}" + (f": {what}" if what else ""))
        return self.exit_status

    def report_failure(self, error: BaseException | str, what: str = "") -> int:
        """A failure the run ended with: once a signal came, it is the interruption's (the
        cleanup it started stopped what the run was using, ZooKeeper or a node, under a call
        in flight), reported as :meth:`report`; else the error's one line and exit status 1."""
        if self.received is not None:
            return self.report(what)
        report_error(self.prog, error)
        return 1
