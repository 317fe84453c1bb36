"""fcdpo: teach small LLMs to call functions well on reasoning tasks with DPO on teacher chains.

The domain library. No orchestration (Prefect) or tracking (MLflow) imports live here, so every
part can be used from a notebook.
"""

__version__ = "0.1.0"
