"""``python -m model.reports.dit_demo``: the command line of :func:`model.reports.dit_demo.cli.main`."""
from model.reports.dit_demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
