"""Command-line entry points of `python -m genrefocus_core`: demo, render, deblur, refocus."""
