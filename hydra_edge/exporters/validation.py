"""Is an export right? Its logits against PyTorch's, judged per precision.

fp32 must match within a tolerance; fp16 and int4 round by design and are judged by their error
relative to the spread of the logits and by the next token wherever that choice is decisive.
The validation rows are the ones the run was scored on (config.run_data_files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hydra_edge.training.config import run_data_files

TOLERANCE = {"fp32": 1e-3}


# fp16 (weights and activations) rounds every op to 11 significant bits: checked like int4 but
# tighter. Measured on the demo adapter: relative error ~0.001-0.003.
FP16_MAX_RELATIVE_ERROR = 0.02


# Measured 0.988-1.0: rounding errors are correlated across the vocabulary (they come through the
# hidden state), so a rare flip past "3 sigma" happens.
FP16_MIN_DECISIVE_AGREEMENT = 0.95


# int4 (MatMulNBits, k-quant, fp32 activations) changes logits by design. It is checked by its
# mean error relative to the spread of the logits, and by whether it picks the same next token
# as the float32 reference wherever that choice is decisive: where the reference's top-1 leads
# its runner-up by more than DECISIVE_SIGMAS noise standard deviations of the (top-1 - top-2)
# difference (σ_diff = √2 · robust std of the position's logit error). A flip there is a > 3σ event,
# so an error; near-ties flip by chance (a random-weight base has almost only near-ties).
# The relative error (mean |diff| / std of the reference logits) of unrelated logits is about
# 1.1 (2/√π·√2), so a broken or mismatched export lands there. int4 rounding measured 0.13-0.15
# on the demo adapter and 0.30 on a random-weight model with Qwen2.5-0.5B's 24 layers (its
# logits are nearly flat, so the same rounding is large next to their spread); 0.5 sits between.
INT4_MIN_DECISIVE_AGREEMENT = 0.9  # a broken export agrees ~1/vocab of the time


INT4_MAX_RELATIVE_ERROR = 0.5


DECISIVE_SIGMAS = 3.0


# Too few decisive positions make the agreement there vacuous: on Gemma 3 270M, int4's error is
# so large next to the margins that no position was decisive, and the export "passed" while
# top-1 agreed at 31-34 % of positions and held-out exact-match fell from 86.1 % (fp32) to
# 75.9 %. Below this share of decisive positions, the next-token agreement over all positions
# must reach MIN_OVERALL_AGREEMENT instead.
MIN_DECISIVE_SHARE = 0.25


MIN_OVERALL_AGREEMENT = {"int4": 0.6, "fp16": 0.8, "q8_0": 0.8}


# A GGUF base in llama.cpp's Q8_0 (8-bit blocks of 32, F32 activations): between fp16 and int4.
Q8_0_MAX_RELATIVE_ERROR = 0.05


# Precisions that round by design, judged by agreement and relative error instead of a tolerance.
ROUNDED = ("int4", "fp16", "q8_0")


VALIDATION_PROMPTS = 4


def validation_prompts(adapter_dir: Path, count: int = VALIDATION_PROMPTS) -> list[list[dict]]:
    """Fixed conversations: the training run's held-out rows when it had any, else generic prompts."""
    from hydra_edge.data.records import read_records
    from hydra_edge.files import read_json_object

    config_file = adapter_dir / "run_config.json"
    run_config = (
        read_json_object(config_file, "the run's settings are damaged; retrain") if config_file.is_file() else {}
    )
    model, data, eval_file = run_config.get("model"), run_config.get("data"), run_config.get("eval_data")
    if isinstance(model, str) and isinstance(data, list) and (eval_file is None or isinstance(eval_file, str)):
        eval_file = run_data_files(model, data, eval_file)[1]  # a preset's demo rows when it trained on them
    if isinstance(eval_file, str) and eval_file and Path(eval_file).is_file():
        records = [r for r in read_records(eval_file) if r.messages][:count]
        if records:
            return [r.messages for r in records]  # whole conversations: answer positions are checked too
    return [
        [{"role": "user", "content": text}]
        for text in (
            "Hello! Who are you?",
            "Summarise: the cat sat on the mat.",
            "What is 2 + 2?",
            "Translate 'good morning'.",
        )
    ][:count]


def compare_logits(got: np.ndarray, expected: np.ndarray) -> dict:
    """ONNX vs PyTorch logits over all validation positions. (P, vocab) each."""
    same_top1 = got.argmax(-1) == expected.argmax(-1)  # (P,)
    top2 = np.sort(expected, axis=-1)[:, -2:]  # (P, 2)
    margin = top2[:, 1] - top2[:, 0]  # (P,)
    error = got - expected  # (P, vocab)
    # Robust std (1.4826 · median absolute deviation), so the errors under test do not inflate it.
    spread = 1.4826 * np.median(np.abs(error - np.median(error, axis=-1, keepdims=True)), axis=-1)  # (P,)
    noise = np.sqrt(2.0) * spread  # (P,) std of the top-1 minus top-2 error
    decisive = margin > DECISIVE_SIGMAS * noise
    return {
        "max_abs_logit_diff": float(np.abs(got - expected).max()),
        "top1_agreement": float(same_top1.mean()),
        "positions": int(same_top1.shape[0]),
        "decisive_positions": int(decisive.sum()),
        "decisive_agreement": float(same_top1[decisive].mean()) if decisive.any() else 1.0,
        "relative_error": float(np.abs(got - expected).mean() / max(float(expected.std()), 1e-12)),
    }


def _rounded_limits(precision: str) -> tuple[float, float]:
    """(least decisive agreement, largest relative error) of a precision that rounds by design."""
    if precision == "int4":
        return INT4_MIN_DECISIVE_AGREEMENT, INT4_MAX_RELATIVE_ERROR
    if precision == "q8_0":
        return FP16_MIN_DECISIVE_AGREEMENT, Q8_0_MAX_RELATIVE_ERROR
    return FP16_MIN_DECISIVE_AGREEMENT, FP16_MAX_RELATIVE_ERROR


def validation_problem(check: dict, precision: str) -> str | None:
    """Why a check fails for this precision, or None."""
    if precision in ROUNDED:
        min_agreement, max_error = _rounded_limits(precision)
        if check["relative_error"] > max_error:  # unrelated logits: a broken or mismatched export
            return f"mean logit error {check['relative_error']:.3f} of their spread > {max_error}"
        positions = check.get("positions", check["decisive_positions"])
        if check["decisive_positions"] < MIN_DECISIVE_SHARE * positions:
            if check["top1_agreement"] < MIN_OVERALL_AGREEMENT[precision]:
                return (
                    f"only {check['decisive_positions']} of {positions} positions are decisive, and next-token "
                    f"agreement with PyTorch over all of them is {check['top1_agreement']:.3f} < "
                    f"{MIN_OVERALL_AGREEMENT[precision]}: {precision} changes this model's choices; "
                    "export fp32" + (" or fp16" if precision == "int4" else "")
                )
        elif check["decisive_agreement"] < min_agreement:
            return (
                f"next-token agreement with PyTorch where its choice is decisive "
                f"{check['decisive_agreement']:.3f} < {min_agreement} ({check['decisive_positions']} positions)"
            )
        return None
    if check["max_abs_logit_diff"] > TOLERANCE[precision]:
        return (
            f"max |ONNX - PyTorch| logit difference {check['max_abs_logit_diff']:.3g} > tolerance "
            f"{TOLERANCE[precision]:g}"
        )
    return None


def describe_criteria(precision: str) -> str:
    if precision in ROUNDED:
        min_agreement, max_error = _rounded_limits(precision)
        return (
            f"next-token agreement >= {min_agreement} where PyTorch's top-1 leads by > "
            f"{DECISIVE_SIGMAS:g} sigma of the error (>= {MIN_OVERALL_AGREEMENT[precision]} over all positions "
            f"when under {MIN_DECISIVE_SHARE:.0%} are decisive), mean |diff| / std(logits) <= {max_error}"
        )
    return f"max |logit diff| <= {TOLERANCE[precision]:g}"


def describe_check(check: dict, precision: str) -> str:
    if precision in ROUNDED:
        return (
            f"next-token agreement {check['decisive_agreement']:.3f} on {check['decisive_positions']} decisive "
            f"positions ({check['top1_agreement']:.3f} on all), relative error {check['relative_error']:.3f}"
        )
    return f"max |logit diff| {check['max_abs_logit_diff']:.2e} <= {TOLERANCE[precision]:g}"
