"""`fastsel score`: exact per-example gradient scores for a whole dataset, the whole-dataset filters that use them,
and the audit report (`inputs` reads, `run` scores, `store` keeps the chunks, `report` draws)."""

from fastsel.experiments.scoring.inputs import ScoreInput, load_input, write_filtered
from fastsel.experiments.scoring.run import ScoreSettings, anchor_references, score_dataset

__all__ = ["ScoreInput", "ScoreSettings", "anchor_references", "load_input", "score_dataset", "write_filtered"]
