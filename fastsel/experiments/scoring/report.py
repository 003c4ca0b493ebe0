"""The audit report of a scored dataset (`fastsel score --report`): report.md and three plots.

- the distribution of gradient norms, loss against norm, response length against norm (PNGs, matplotlib);
- the paper's Table-12 audit per norm third: mean response tokens, loss and norm, and the share of terse responses
  (at most `TERSE_TOKENS` response tokens, the template's end-of-turn tokens included);
- the 20 highest-norm examples with their text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastsel.experiments.data.examples import Example

TERSE_TOKENS = 12
TOP = 20
THIRDS = ("lowest", "middle", "highest")


def norm_thirds(norms: Sequence[float]) -> list[list[int]]:
    """Positions split into thirds by gradient norm (ascending; ties to the lower position); sizes differ by <= 1."""
    order = sorted(range(len(norms)), key=lambda i: (norms[i], i))
    n = len(order)
    bounds = [0, round(n / 3), round(2 * n / 3), n]
    return [order[bounds[t]:bounds[t + 1]] for t in range(3)]


def audit_rows(table: Any) -> list[dict[str, Any]]:
    """One row per norm third: examples, mean response tokens, loss, norm, share of terse responses (%)."""
    norms, losses, lengths = list(table["grad_norm"]), list(table["loss"]), list(table["response_tokens"])
    rows = []
    for name, part in zip(THIRDS, norm_thirds(norms), strict=True):
        k = max(len(part), 1)
        rows.append({"third": name, "examples": len(part),
                     "response_tokens": sum(lengths[i] for i in part) / k, "loss": sum(losses[i] for i in part) / k,
                     "grad_norm": sum(norms[i] for i in part) / k,
                     "terse_percent": 100.0 * sum(lengths[i] <= TERSE_TOKENS for i in part) / k})
    return rows


def write_report(table: Any, examples: Sequence[Example], out_dir: str | os.PathLike[str],
                 title: str = "fastsel score") -> Path:
    """report.md and the PNGs under `out_dir`; `examples` in input order (table's `index`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(table, out)
    lines = [f"# {title}", "", f"{len(table)} examples. Gradient norms are exact (one packed forward+backward per "
             "pass, fp32 per-example math).", "", "## Audit per norm third (the paper's Table 12)", "",
             "| norm third | examples | response tokens | loss | gradient norm | terse responses (%) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['third']} | {r['examples']} | {r['response_tokens']:.1f} | {r['loss']:.3f} | "
              f"{r['grad_norm']:.4g} | {r['terse_percent']:.1f} |" for r in audit_rows(table)]
    lines += ["", f"Terse: at most {TERSE_TOKENS} response tokens (end-of-turn tokens included).", ""]
    lines += [f"![{name}]({file})" for name, file in plots] + ["", f"## The {TOP} highest-norm examples", "",
                                                              "| rank | id | norm | loss | prompt | response |",
                                                              "|---|---|---|---|---|---|"]
    norms = list(table["grad_norm"])
    for rank, i in enumerate(sorted(range(len(norms)), key=lambda i: (-norms[i], i))[:TOP], start=1):
        ex = examples[table["index"][i]]
        lines.append(f"| {rank} | {_cell(ex.id)} | {norms[i]:.4g} | {table['loss'][i]:.3f} | "
                     f"{_cell(ex.prompt, 120)} | {_cell(ex.response, 160)} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plots(table: Any, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms, losses, lengths = list(table["grad_norm"]), list(table["loss"]), list(table["response_tokens"])
    made = []
    for file, name, draw in (
            ("norms_hist.png", "gradient norms", lambda ax: ax.hist(norms, bins=min(50, max(5, len(norms) // 4)))),
            ("loss_vs_norm.png", "loss vs gradient norm", lambda ax: ax.scatter(norms, losses, s=8)),
            ("length_vs_norm.png", "response tokens vs gradient norm", lambda ax: ax.scatter(norms, lengths, s=8))):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        draw(ax)
        ax.set_xlabel("per-example gradient norm")
        ax.set_ylabel({"norms_hist.png": "examples", "loss_vs_norm.png": "loss (nats/token)",
                       "length_vs_norm.png": "response tokens"}[file])
        ax.set_title(name)
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        made.append((name, file))
    return made


__all__ = ["TERSE_TOKENS", "audit_rows", "norm_thirds", "write_report"]
