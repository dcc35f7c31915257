"""GRPO's verifiable rewards: a sampled answer scored 1.0 or 0.0 against a prompt record's `answer`,
by the verifier the record names (`"verifier": number | exact | contains`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def reward_number(answer: str, record: dict) -> float:
    """1 when the last number in the answer equals the record's `answer` (as a number)."""
    got, want = _last_number(answer), _last_number(str(record.get("answer", "")))
    return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


def reward_exact(answer: str, record: dict) -> float:
    return float((answer or "").strip() == str(record.get("answer", "")).strip())


def reward_contains(answer: str, record: dict) -> float:
    return float(str(record.get("answer", "")).strip().lower() in (answer or "").lower())


REWARDS: dict[str, Callable[[str, dict], float]] = {
    "number": reward_number, "exact": reward_exact, "contains": reward_contains,
}
