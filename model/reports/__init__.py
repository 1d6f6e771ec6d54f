"""GPU report and demonstration scripts (``python -m model.reports.<name>``); nothing in the library imports them."""
