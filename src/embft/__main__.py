"""`python -m embft [overrides]` runs the Hydra app; `python -m embft report NAME` writes a report;
`python -m embft predict MODEL_URI INPUT [--out FILE]` classifies a file with a logged classifier;
`python -m embft advise [overrides]` is `python -m embft -m experiment=advise [overrides]`."""

import logging
import os
import signal
import sys
import traceback


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler's stop) raised as a KeyboardInterrupt, so a job cleans
    up as after Ctrl-C: its MLflow run ends KILLED, not RUNNING, and no half-saved model stays."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated("SIGTERM")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from embft.report import main as report_main

        raise SystemExit(report_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "predict":
        from embft.serving.predict import predict_main

        raise SystemExit(predict_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "advise":  # embft advise ARGS = python -m embft -m experiment=advise ARGS
        sys.argv[1:2] = ["-m", "experiment=advise"]
    from embft.app import main as app_main

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        app_main()
    except KeyboardInterrupt as stop:
        # Cleaned up (a running job's run ended KILLED, no half-saved model). End by the signal itself
        # (130 or 143 in a shell), as the sender expects; CPython's own exit by SIGINT after an uncaught
        # KeyboardInterrupt is not reliable under `-c`/runpy (seen exiting 1 on CI).
        if isinstance(stop, Terminated):
            sys.stderr.write("Terminated by SIGTERM (cleaned up as after Ctrl-C: a running job's run is KILLED)\n")
            sig = signal.SIGTERM
        else:
            traceback.print_exc()
            sig = signal.SIGINT
        _die_by(sig)


def _die_by(sig: signal.Signals) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()  # Hydra's job log file
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    raise SystemExit(128 + sig)  # only if the signal is blocked in this thread


if __name__ == "__main__":
    main()
