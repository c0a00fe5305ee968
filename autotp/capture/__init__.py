"""Capture: model -> ATen graph on a meta copy (``export``), and the inputs to capture it with (``inputs``)."""
