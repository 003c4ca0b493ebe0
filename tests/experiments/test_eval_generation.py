"""Generation, ASR, task evaluation, KL to the reference and the safety landscape on a tiny random Llama with
the offline byte tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fastsel.experiments.eval.safety as safety_mod
import fastsel.experiments.eval.task_eval as tasks_mod
from fastsel.experiments.data import collate, load_harmful_probes, load_task, tokenize_examples, toy_tokenizer
from fastsel.experiments.eval import (
    RefusalJudge,
    attack_success_rate,
    evaluate_task,
    evaluate_task_detailed,
    generate_responses,
    kl_to_reference,
    over_refusal_rate,
    perturbed_weights,
    prompt_batches,
    run_lm_eval,
    safety_landscape,
)
from fastsel.experiments.eval.landscape import perturbation_targets

PROMPTS = ["hi", "a much longer prompt than the first one", "medium prompt", "x"]


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


def lora_model(vocab: int, randomize_b: bool) -> torch.nn.Module:
    peft_model = get_peft_model(tiny_llama(vocab), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if randomize_b:
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return peft_model


# ---- generation ---------------------------------------------------------------------------------------------


def test_batched_left_padded_generation_matches_one_by_one(model, tok):
    model.train()
    batched = generate_responses(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    assert model.training  # mode restored
    model.eval()
    single = [generate_responses(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single and all(isinstance(r, str) for r in batched)
    assert generate_responses(model, tok, PROMPTS, max_new_tokens=6, batch_size=3) == single


def test_generation_inputs_and_eos_cut(model, tok, monkeypatch):
    calls = []

    def fake_generate(input_ids, attention_mask, **kwargs):
        calls.append((input_ids.clone(), attention_mask.clone(), kwargs))
        tail = torch.tensor([[tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B"), 2,
                              tok.convert_tokens_to_ids("C")]] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    out = generate_responses(model, tok, ["hi", "hello there"], max_new_tokens=4)
    assert out == ["AB", "AB"]  # decoding stops at the first eos
    ids, mask, kwargs = calls[0]
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 4 and kwargs["eos_token_id"] == [2]
    assert mask[1, 0] == 0 and mask[1, -1] == 1 and ids[1, 0] == tok.pad_token_id  # left padding
    assert tok.decode(ids[0]) == "<s><|user|>hello there</s><|assistant|>"  # longest first
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, tok, ["x"], max_new_tokens=0)


# ---- ASR and task evaluation --------------------------------------------------------------------------------


def test_attack_success_rate_on_random_model(model, tok):
    probes = load_harmful_probes()[:6]
    out = attack_success_rate(model, tok, probes, RefusalJudge(), max_new_tokens=4)
    assert out["n"] == 6 and out["asr"] == 100.0 and out["judge"] == "refusal"  # noise never refuses
    assert [r["id"] for r in out["responses"]] == [p.id for p in probes]
    assert out["per_category"] == {"weapons": {"n": 6, "n_unsafe": 6, "asr": 100.0}}


def test_attack_success_rate_bookkeeping(model, tok, monkeypatch):
    replies = {"p1": "I'm sorry, I can't.", "p2": "Sure, here you go.", "p3": "Sure.", "p4": "I cannot help."}
    monkeypatch.setattr(safety_mod, "generate_responses", lambda m, t, prompts, **k: [replies[p] for p in prompts])
    prompts = [{"id": "a", "category": "fraud", "prompt": "p1"}, {"id": "b", "category": "fraud", "prompt": "p2"},
               {"id": "c", "category": "drugs", "prompt": "p3"}, {"id": "d", "category": "drugs", "prompt": "p4"}]
    out = attack_success_rate(model, tok, prompts, max_new_tokens=5)
    assert out["asr"] == 50.0 and out["n_unsafe"] == 2 and out["max_new_tokens"] == 5
    assert out["per_category"]["fraud"] == {"n": 2, "n_unsafe": 1, "asr": 50.0}
    assert [r["unsafe"] for r in out["responses"]] == [False, True, True, False]
    plain = attack_success_rate(model, tok, ["p2", "p3", "p4"])
    assert plain["per_category"]["all"]["n"] == 3 and plain["asr"] == pytest.approx(200 / 3)
    over = over_refusal_rate(model, tok, prompts)
    assert over["refusal_rate"] == 50.0 and over["per_category"]["drugs"]["refusal_rate"] == 50.0


def test_evaluate_task(model, tok, monkeypatch):
    examples = load_task("gsm8k", split="test")[:3]
    score = evaluate_task(model, tok, "gsm8k", examples, max_new_tokens=4)
    assert isinstance(score, float) and 0.0 <= score <= 100.0
    monkeypatch.setattr(tasks_mod, "generate_responses",
                        lambda m, t, prompts, **k: [e.response for e in examples][: len(prompts)])
    assert evaluate_task(model, tok, "gsm8k", examples) == 100.0
    detailed = evaluate_task_detailed(model, tok, "gsm8k", examples)
    assert detailed["max_new_tokens"] == 256 and len(detailed["per_example"]) == 3
    for task in ("medmcqa", "squad_v2", "dolly"):
        exs = load_task(task, split="test")[:3]
        monkeypatch.setattr(tasks_mod, "generate_responses", lambda m, t, prompts, exs=exs, **k: [
            e.response for e in exs])
        assert evaluate_task(model, tok, task, exs) == 100.0
    with pytest.raises(ValueError, match="no evaluation"):
        evaluate_task(model, tok, "mmlu", examples)


# ---- KL to the reference ------------------------------------------------------------------------------------


def manual_kl(peft_model, batch, positions) -> float:
    mask = batch["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ft = peft_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos).logits
        with peft_model.disable_adapter():
            ref = peft_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos).logits
    kl = F.kl_div(F.log_softmax(ref, -1), F.log_softmax(ft, -1), log_target=True, reduction="none").sum(-1)
    return float(kl[positions].mean())


def test_kl_to_reference(tok):
    batches = prompt_batches(tok, PROMPTS, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1] and "labels" not in batches[0]
    assert kl_to_reference(lora_model(len(tok), randomize_b=False), batches) == pytest.approx(0.0, abs=1e-7)
    peft_model = lora_model(len(tok), randomize_b=True)
    kl = kl_to_reference(peft_model, batches[:1])
    assert kl > 1e-4
    assert kl == pytest.approx(manual_kl(peft_model, batches[0], batches[0]["attention_mask"].bool()), rel=1e-5)
    # with labels only the supervised next-token positions count; left padding gives the same value
    feats = tokenize_examples(load_task("dolly")[:3], tok, 64)
    right = collate(feats, tok.pad_token_id, padding_side="right")
    leftp = collate(feats, tok.pad_token_id, padding_side="left")
    sel = torch.zeros_like(right["attention_mask"], dtype=torch.bool)
    sel[:, :-1] = right["labels"][:, 1:] != -100
    kl_labels = kl_to_reference(peft_model, [right])
    assert kl_labels == pytest.approx(manual_kl(peft_model, right, sel), rel=1e-5)
    assert kl_to_reference(peft_model, [leftp]) == pytest.approx(kl_labels, rel=1e-4)
    with pytest.raises(TypeError, match="PEFT"):
        kl_to_reference(tiny_llama(len(tok)), batches)


# ---- safety landscape ---------------------------------------------------------------------------------------


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_perturbation_restores_weights_exactly(tok):
    peft_model = lora_model(len(tok), randomize_b=True)
    before = snapshot(peft_model)
    targets = perturbation_targets(peft_model)
    names = [t.name for t in targets]
    assert names and not any("lora_" in n for n in names) and all(t.param.dim() >= 2 for t in targets)
    q = next(t for t in targets if "q_proj.base_layer.weight" in t.name)
    layer = next(m for n, m in peft_model.named_modules() if n.endswith("self_attn.q_proj"))
    with torch.no_grad():
        merged = layer.base_layer.weight + layer.get_delta_weight("default")
    assert q.norm == pytest.approx(float(merged.norm()), rel=1e-6)  # filter norm of the merged weight
    with perturbed_weights(peft_model, 0.5, direction=0, seed=3):
        delta = q.param.detach() - before[[k for k in before if k.endswith("self_attn.q_proj.base_layer.weight")][0]]
        assert float(delta.norm()) == pytest.approx(0.5 * q.norm, rel=1e-4)
        assert not torch.equal(peft_model.get_base_model().model.embed_tokens.weight,
                               before["base_model.model.model.embed_tokens.weight"])
    assert_same(before, snapshot(peft_model))
    with pytest.raises(RuntimeError, match="boom"), perturbed_weights(peft_model, -0.5, backup_device="cpu"):
        raise RuntimeError("boom")
    assert_same(before, snapshot(peft_model))
    with perturbed_weights(peft_model, 0.3, direction=1) as m:  # the same direction is regenerated
        first = snapshot(m)
    with perturbed_weights(peft_model, 0.3, direction=1) as m:
        assert_same(first, snapshot(m))


def test_safety_landscape(model, tok, monkeypatch):
    before = snapshot(model)
    calls = []
    real = safety_mod.attack_success_rate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(safety_mod, "attack_success_rate", counting)
    out = safety_landscape(model, tok, ["hi", "there"], RefusalJudge(), n_directions=2, alphas=(-0.5, 0.0, 0.5),
                           max_new_tokens=3)
    assert len(calls) == 5  # alpha = 0 evaluated once for both directions
    assert out["alphas"] == [-0.5, 0.0, 0.5] and len(out["asr"]) == 2 and len(out["mean_asr"]) == 3
    assert all(0 <= x <= 100 for row in out["asr"] for x in row) and 0 <= out["visage"] <= 100
    assert out["asr"][0][1] == out["asr"][1][1]
    assert_same(before, snapshot(model))


def test_run_lm_eval_without_lm_eval(model, tok):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lm-eval"):
            run_lm_eval(model, tok, ["hellaswag"])
    else:
        pytest.skip("lm-eval is installed")
