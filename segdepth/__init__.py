"""SegDepth Live application layer: the ``segdepth`` command line and the end-to-end demo."""
