"""DMLP inside cleanlab's Datalab: the issue manager ``dmlp_label`` (``pip install 'dmlp_plugin[cleanlab]'``).

Importing this module registers it with cleanlab (``cleanlab.datalab.internal.issue_manager_factory.register``)::

    import dmlp_plugin.integrations.datalab  # noqa: F401  (registers "dmlp_label")
    from cleanlab import Datalab

    lab = Datalab(data={"label": noisy}, label_name="label")
    lab.find_issues(features=X, issue_types={"dmlp_label": {"trusted_indices": idx, "trusted_labels": y_idx}})
    lab.get_issues("dmlp_label")            # is_dmlp_label_issue, dmlp_label_score (low: likely wrong)
    lab.get_info("dmlp_label")["suggested_label"]

The labels are purified by :func:`dmlp_plugin.purify_labels` (any registered preprocessor: ``method``,
``params``, ``second_view``, ``seed``, ``device``, ``estimate_folds`` go through), and a row is an issue when
its purified label differs from its given one. cleanlab prints an error raised by an issue manager as
``Error in dmlp_label: ...`` and carries on; the message names the argument to fix.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from dmlp_plugin.errors import MissingDependency, UserError

try:
    import pandas as pd
    from cleanlab.datalab.internal import issue_finder
    from cleanlab.datalab.internal.issue_manager import IssueManager
    from cleanlab.datalab.internal.issue_manager_factory import register
except ImportError:
    raise MissingDependency("dmlp_plugin.integrations.datalab", "cleanlab",
                            "pip install 'dmlp_plugin[cleanlab]'") from None

ISSUE_NAME = "dmlp_label"
OPTIONS = ("method", "params", "second_view", "seed", "device", "estimate_folds")


class DMLPLabelIssueManager(IssueManager):
    """Label issues found by DMLP label purification: a row is an issue when DMLP (or the preprocessor
    ``method``) changes its given label, using a small trusted subset (``trusted_indices`` and their
    ``trusted_labels``, in the values of the label column, at least one per class).

    ``dmlp_label_score``: the purified (soft) label's probability of the given label, in [0, 1]; lower is
    more likely wrong. ``info``: ``suggested_label`` (= ``predicted_label``, the purified label) and
    ``given_label`` per row as class names, ``confidence`` per row (the purified label's probability),
    ``estimated_accuracy`` of the purified labels (K-fold over the trusted subset, no true labels),
    ``num_label_issues``, ``average_label_quality``, ``method``. Summary score: the share of rows not flagged."""

    description: ClassVar[str] = ("Examples whose given label DMLP label purification (Tu et al., CVPR 2023) changes, "
                                  "using a small trusted subset and the features, are flagged as having label "
                                  "issues.")
    issue_name: ClassVar[str] = ISSUE_NAME
    verbosity_levels = {0: [], 1: ["estimated_accuracy"], 2: ["method"], 3: []}

    def __init__(self, datalab, trusted_indices=None, trusted_labels=None, **kwargs):
        super().__init__(datalab)
        self.trusted_indices = trusted_indices
        self.trusted_labels = trusted_labels
        self.options = {k: kwargs[k] for k in OPTIONS if k in kwargs}

    def find_issues(self, features=None, **_: Any) -> None:
        from dmlp_plugin.api import purify_labels  # noqa: PLC0415 - torch import on use

        if features is None:
            raise UserError("dmlp_label needs the features: Datalab.find_issues(features=X, issue_types="
                            "{'dmlp_label': {...}}) with X (N, d)")
        if self.trusted_indices is None or self.trusted_labels is None:
            raise UserError("dmlp_label needs issue_types={'dmlp_label': {'trusted_indices': ..., 'trusted_labels': "
                            "...}}: the rows whose label you trust and those labels")
        given = np.asarray(self.datalab.labels, dtype=np.int64)
        names = list(self.datalab.class_names)
        result = purify_labels(features, given, self.trusted_indices, self._class_indices(names),
                               num_classes=len(names), **self.options)
        score = result.soft[np.arange(given.size), given].astype(np.float64)
        flagged = np.asarray(result.changed, dtype=bool)
        self.issues = pd.DataFrame({f"is_{self.issue_name}_issue": flagged, self.issue_score_key: score})
        self.summary = self.make_summary(score=float(1.0 - flagged.mean()))
        self.info = self.collect_info(result, given, names, score)

    def _class_indices(self, names: list) -> np.ndarray:
        """``trusted_labels`` (values of the label column) -> Datalab's class indices 0..K-1."""
        index = {name: i for i, name in enumerate(names)}
        out = []
        for value in np.asarray(self.trusted_labels).tolist():
            if value not in index:
                raise UserError(f"trusted_labels holds {value!r}, which is not a class of the label column "
                                f"({', '.join(str(n) for n in names[:10])}{', ...' if len(names) > 10 else ''}); give "
                                f"trusted labels as label-column values")
            out.append(index[value])
        return np.asarray(out, dtype=np.int64)

    def collect_info(self, result, given: np.ndarray, names: list, score: np.ndarray) -> dict:
        suggested = [names[i] for i in result.hard.tolist()]
        return {
            "num_label_issues": int(result.changed.sum()),
            "average_label_quality": float(score.mean()),
            "given_label": [names[i] for i in given.tolist()],
            "suggested_label": suggested,
            "predicted_label": suggested,
            "confidence": result.confidence.astype(np.float64).tolist(),
            "estimated_accuracy": result.estimated_accuracy,
            "method": result.method,
            "trusted_indices": result.trusted_indices.tolist(),
        }


def _forward_features() -> None:
    """cleanlab hands ``find_issues(features=...)`` only to the issue types its table lists: list ours too, so
    ``features`` reaches :meth:`DMLPLabelIssueManager.find_issues` as it reaches the built-in ``label``."""
    table = getattr(issue_finder, "_CLASSIFICATION_ARGS_DICT", None)
    if isinstance(table, dict):
        table.setdefault(ISSUE_NAME, ["features"])


register(DMLPLabelIssueManager)
_forward_features()
