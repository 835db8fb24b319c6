"""`python -m embft [overrides]` runs the Hydra app; `python -m embft report NAME` writes a report;
`python -m embft predict MODEL_URI INPUT [--out FILE]` classifies a file with a logged classifier."""

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from embft.report import main as report_main

        raise SystemExit(report_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "predict":
        from embft.tracking.serving import predict_main

        raise SystemExit(predict_main(sys.argv[2:]))
    from embft.app import main as app_main

    app_main()


if __name__ == "__main__":
    main()
