"""Attack success rate (ASR) of a chat model on harmful prompts, and over-refusal on benign look-alikes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from fastsel.experiments.eval.generate import generate_responses
from fastsel.experiments.eval.judges import Judge, RefusalJudge


def _fields(item: Any, index: int) -> tuple[str, str, str]:
    """(id, category, prompt) of a plain string, a mapping, or an object with .prompt (HarmfulPrompt)."""
    if isinstance(item, str):
        return str(index), "all", item
    get = item.get if isinstance(item, Mapping) else lambda k, d=None: getattr(item, k, d)
    prompt = get("prompt")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt #{index} has no text 'prompt' field: {item!r}")
    return str(get("id", index)), str(get("category", "all") or "all"), prompt


def judge_responses(prompts: Sequence[Any], responses: Sequence[str], judge: Judge) -> dict[str, Any]:
    """ASR summary of already generated `responses` (see `attack_success_rate`)."""
    rows = [_fields(p, i) for i, p in enumerate(prompts)]
    if len(rows) != len(responses):
        raise ValueError(f"got {len(rows)} prompts but {len(responses)} responses")
    if not rows:
        raise ValueError("no prompts to evaluate")
    verdicts = judge.judge_details([r[2] for r in rows], list(responses))
    per_category: dict[str, dict[str, float]] = {}
    for (_, category, _), v in zip(rows, verdicts, strict=True):
        c = per_category.setdefault(category, {"n": 0, "n_unsafe": 0})
        c["n"] += 1
        c["n_unsafe"] += int(v.unsafe)
    for c in per_category.values():
        c["asr"] = 100.0 * c["n_unsafe"] / c["n"]
    n_unsafe = sum(v.unsafe for v in verdicts)
    return {
        "asr": 100.0 * n_unsafe / len(rows), "n": len(rows), "n_unsafe": n_unsafe,
        "judge": getattr(judge, "name", type(judge).__name__), "per_category": dict(sorted(per_category.items())),
        "responses": [{"id": i, "category": c, "prompt": p, "response": r, "unsafe": v.unsafe, "reason": v.reason,
                       "guard_categories": list(v.categories)}
                      for (i, c, p), r, v in zip(rows, responses, verdicts, strict=True)],
    }


def attack_success_rate(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], judge: Judge | None = None, *,
                        max_new_tokens: int = 128, batch_size: int = 8, system_prompt: str | None = None
                        ) -> dict[str, Any]:
    """Generate greedy responses to harmful `prompts` and judge them.

    prompts: strings, or items with id/category/prompt (`HarmfulPrompt`s, dicts). judge: default `RefusalJudge()`.
    Returns {"asr": % unsafe, "n", "n_unsafe", "judge", "per_category": {cat: {"asr", "n", "n_unsafe"}},
    "responses": [{"id", "category", "prompt", "response", "unsafe", "reason", "guard_categories"}],
    "max_new_tokens"}.
    """
    judge = judge or RefusalJudge()
    texts = [_fields(p, i)[2] for i, p in enumerate(prompts)]
    responses = generate_responses(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   system_prompt=system_prompt)
    return {**judge_responses(prompts, responses, judge), "max_new_tokens": max_new_tokens}


def over_refusal_rate(model: nn.Module, tokenizer: Any, benign_prompts: Sequence[Any], *,
                      judge: RefusalJudge | None = None, max_new_tokens: int = 64, batch_size: int = 8,
                      system_prompt: str | None = None) -> dict[str, Any]:
    """Refusal rate (%) on benign requests that look harmful: 100 - the refusal judge's "ASR" on them.

    Returns the `attack_success_rate` dict plus "refusal_rate" (and per-category "refusal_rate")."""
    out = attack_success_rate(model, tokenizer, benign_prompts, judge or RefusalJudge(),
                              max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt)
    out["refusal_rate"] = 100.0 - out["asr"]
    for c in out["per_category"].values():
        c["refusal_rate"] = 100.0 - c["asr"]
    return out
