"""Shared basics of every family: errors, image conversion and files, defocus maps, aperture shapes and
the built-in test scene. Nothing here imports a family (generative, classical, depth)."""
