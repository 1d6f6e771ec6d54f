"""Command-line entry points (``python -m model.cli.<name>``); thin layers over the library."""
