"""Training: the Trainer (``trainer``), the builders that turn a config into its components (``build``), and the
hooks (``hooks``: logging, summary, verification, checkpoints, profiler).

The top layer of the library: may import every other engine subpackage.
"""
