"""`python -m embft [overrides]` runs the Hydra app; `python -m embft report NAME` writes a report;
`python -m embft predict MODEL_URI INPUT [--out FILE]` classifies a file with a logged classifier;
`python -m embft advise [overrides]` is `python -m embft -m experiment=advise [overrides]`."""

import os
import signal
import sys


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
    except Terminated:
        # Cleaned up; end by SIGTERM itself (exit status 143 in a shell), as the sender expects.
        sys.stderr.write("Terminated by SIGTERM (cleaned up as after Ctrl-C: a running job's run is KILLED)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
