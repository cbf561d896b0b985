"""Builders of real-format test inputs (an NVIDIA .run, Debian packages); not shipped."""
