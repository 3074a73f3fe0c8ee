"""The offline pipeline: data -> teacher -> ranklog -> students -> index -> replay -> report.

One module per stage (``data``, ``teacher``, ``ranklog``, ``students``, ``index``, ``replay``, ``report``, each
with a ``run(ctx)``), the config schema (:mod:`.config`), the generic runner with skip-if-unchanged and crash
safety (:mod:`.runner`) and the stage list with :func:`run_pipeline` (:mod:`.run`). ``ablation`` runs the
distillation ablation of the two-tower students on top of a pipeline run.
"""

from .config import PipelineConfig, load_config
from .run import STAGES, code_hash, run_pipeline

__all__ = ["PipelineConfig", "STAGES", "code_hash", "load_config", "run_pipeline"]
