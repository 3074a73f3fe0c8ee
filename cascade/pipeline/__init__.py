"""The offline pipeline: data -> channels -> teacher -> ranklog -> students -> index -> replay -> report.

One module per step (``data``, ``teacher``, ``ranklog``, ``students``, ``index``, ``replay``, ``report``, each
with a ``run(ctx)``), the config schema (:mod:`.config`), the generic runner with skip-if-unchanged and crash
safety (:mod:`.runner`) and the step list with :func:`run_pipeline` (:mod:`.run`). ``ablation`` runs the
distillation ablation of the two-tower students on top of a pipeline run.
"""

from .config import PipelineConfig, load_config
from .run import STEPS, code_hash, run_pipeline

__all__ = ["PipelineConfig", "STEPS", "code_hash", "load_config", "run_pipeline"]
