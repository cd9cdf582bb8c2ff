"""Metrics of a backend's outputs against the float model's: logits per position, embeddings, greedy agreement."""

from __future__ import annotations

import numpy as np


def position_metrics(reference: np.ndarray, got: np.ndarray) -> dict[str, np.ndarray]:
    """reference, got: logits [S, V] at the same S positions -> per-position metrics, each [S]."""
    ref, out = reference.astype(np.float64), got.astype(np.float64)
    diff = np.abs(out - ref)
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1)
    cosine = np.where(norms > 0, (ref * out).sum(-1) / np.maximum(norms, 1e-300), 1.0)
    log_p, log_q = _log_softmax(ref), _log_softmax(out)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)
    return {"max_abs": diff.max(-1), "mean_abs": diff.mean(-1), "cosine": cosine, "kl": kl,
            "top1": (out.argmax(-1) == ref.argmax(-1)).astype(np.float64)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def leading_agreement(reference_tokens, tokens) -> int:
    count = 0
    for a, b in zip(reference_tokens, tokens):
        if a != b:
            break
        count += 1
    return count


def decoder_metrics(reference_logits: np.ndarray, got_logits: np.ndarray) -> dict[str, dict]:
    """Logits [N + 1, V] (prefill, then N decode steps) -> {"decoder.prefill": ..., "decoder.decode": ...}."""
    per = position_metrics(reference_logits, got_logits)
    steps = len(reference_logits) - 1
    greedy = leading_agreement(reference_logits.argmax(-1), got_logits.argmax(-1))
    decode = {"max_abs": float(per["max_abs"][1:].max()), "mean_abs": float(per["mean_abs"][1:].mean()),
              "cosine": float(per["cosine"][1:].min()), "kl": float(per["kl"][1:].max()),
              "top1": float(per["top1"][1:].mean()), "greedy": greedy / (steps + 1),
              "top1_count": f"{int(per['top1'][1:].sum())}/{steps}", "greedy_count": f"{greedy}/{steps + 1}"}
    prefill = {k: float(per[k][0]) for k in ("max_abs", "mean_abs", "cosine", "kl", "top1")}
    return {"decoder.prefill": prefill, "decoder.decode": decode}


def relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    """||got - reference|| / ||reference||, in float64."""
    ref, out = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def embedding_metrics(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """An encoder's output against the float encoders' (same shape): max and mean |error| over every element, and
    the cosine similarity of the two outputs flattened, in float64."""
    ref, out = np.asarray(reference, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    if ref.shape != out.shape:
        raise RuntimeError(f"encoder output of {np.asarray(got).size} values, the float encoder's {np.asarray(reference).size}")
    diff = np.abs(out - ref)
    norms = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float(ref @ out / norms) if norms > 0 else float(np.array_equal(ref, out))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "cosine": cosine}


def greedy_text_agreement(text: str, reference_tokens: list[int], stop_ids, tokenizer) -> dict:
    """How many of the float model's greedy tokens (up to the first stop token, where a runtime that stops by itself
    stops too) a runtime that returns only text reproduces: the longest prefix whose detokenized text `text` starts
    with. For Google's engine (compare's litertlm rows, the harness's LiteRT-LM runs)."""
    stops = set(stop_ids)
    expected = []
    for token in reference_tokens:
        if token in stops:
            break
        expected.append(token)
    agree = 0
    for k in range(1, len(expected) + 1):
        if not text.startswith(tokenizer.decode(expected[:k])):
            break
        agree = k
    return {"greedy": agree / len(expected) if expected else float(text.strip() == ""),
            "greedy_count": f"{agree}/{len(expected)}", "text": text}
