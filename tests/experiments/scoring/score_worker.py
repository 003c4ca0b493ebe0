"""torchrun worker of test_run.py: each rank scores its share of the chunks into argv[1]'s folder."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]

from scoring_case import SETTINGS, tiny_scorer  # noqa: E402
from torchrun import worker_main  # noqa: E402

from fastsel.experiments.scoring import score_dataset  # noqa: E402


def score(out_dir: str) -> None:
    model, tok = tiny_scorer()
    score_dataset(model, tok, sys.argv[2], out_dir=out_dir, settings=SETTINGS, progress=False,
                  prompt_column="question", response_column="answer", id_column="uid")


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:2], {"score": score}, ["score"]))
