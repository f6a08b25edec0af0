"""dmlp_plugin: purify noisy labels with DMLP and benchmark noisy-label methods on them."""

__version__ = "0.1.0"
