"""Temporary: the old names of the viewer's callers (train_grpo.py, evaluate.py, mrgr1/ablation.py)
until they import the new modules; delete this file then. Nothing else may import it.

    viewer.write_rollout_page, viewer.write_index  ->  mrgr1.rollout_viewer
    viewer.plot_curves, viewer.pyplot              ->  mrgr1.charts
    viewer.write_eval_report                       ->  mrgr1.eval_report
"""
from .charts import plot_curves, pyplot  # noqa: F401
from .eval_report import write_eval_report  # noqa: F401
from .rollout_viewer import write_index, write_rollout_page  # noqa: F401
