"""`python -m embft [overrides]` runs the Hydra app; `python -m embft report NAME` writes a report."""

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from embft.report import main as report_main

        raise SystemExit(report_main(sys.argv[2:]))
    from embft.app import main as app_main

    app_main()


if __name__ == "__main__":
    main()
