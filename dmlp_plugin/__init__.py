"""dmlp_plugin: purify noisy labels with DMLP and benchmark noisy-label methods on them.

From Python (arrays in, arrays out; see :mod:`dmlp_plugin.api`)::

    from dmlp_plugin import purify_labels, select_trusted
    result = purify_labels(features, noisy_labels, trusted_indices, trusted_labels)

Plugin authors: the interfaces are in :mod:`dmlp_plugin.interfaces`; ``TrainData`` / ``RunResult`` (what a
training method takes and returns) and ``UserError`` (the one-line error) are importable from here.
Names are imported on first use, so ``import dmlp_plugin`` stays cheap (no torch).
"""

__version__ = "0.1.0"

_EXPORTS = {
    "purify_labels": "dmlp_plugin.api",
    "select_trusted": "dmlp_plugin.api",
    "load_labels": "dmlp_plugin.api",
    "save_labels": "dmlp_plugin.api",
    "list_components": "dmlp_plugin.api",
    "PurifyResult": "dmlp_plugin.api",
    "PurifyInputs": "dmlp_plugin.records",
    "TrainData": "baselines.common",
    "RunResult": "baselines.common",
    "UserError": "dmlp_plugin.errors",
    "MissingDependency": "dmlp_plugin.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dmlp_plugin' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
