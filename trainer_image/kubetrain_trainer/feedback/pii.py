"""PII and secret scrubbing: each match becomes a typed placeholder such as `<EMAIL>`.

Patterns favour precision on the obvious shapes (a feedback log is not a DLP system): an
email address, a phone number written with separators or a `+` country code, an IPv4
address with every octet <= 255, a 13-19 digit card number that passes the Luhn check,
AWS access key ids, `sk-...` API keys, bearer tokens and PEM private-key blocks. Secrets
go first, so a key inside an email-like string is not half-replaced.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_BEARER = re.compile(r"\b(Bearer)\s+[A-Za-z0-9\-._~+/]{16,}=*", re.IGNORECASE)
_AWS_KEY = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_API_KEY = re.compile(r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{20,}\b")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
# 13-19 digits, optionally in groups split by single spaces or dashes.
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w]|[.-]\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    # international: +CC then 2-5 groups of digits split by single separators
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    # North American style: (555) 123-4567, 555-123-4567, 555.123.4567
    r"|(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"
    r")(?![\w]|[.-]\d)"
)

PLACEHOLDERS = (
    "PRIVATE_KEY",
    "BEARER_TOKEN",
    "AWS_KEY",
    "API_KEY",
    "EMAIL",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "PHONE",
)


def luhn_ok(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum (card numbers do; most others not)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str | None:
    digits = re.sub(r"[ -]", "", match.group())
    return "<CREDIT_CARD>" if luhn_ok(digits) and len(set(digits)) > 1 else None


def _bearer(match: re.Match[str]) -> str:
    return f"{match.group(1)} <BEARER_TOKEN>"


# (placeholder type, pattern, replacement: a fixed string or a function that returns None
# to keep the match), in the order they apply.
_RULES: tuple[tuple[str, re.Pattern[str], str | Callable[[re.Match[str]], str | None]], ...] = (
    ("PRIVATE_KEY", _PRIVATE_KEY, "<PRIVATE_KEY>"),
    ("BEARER_TOKEN", _BEARER, _bearer),
    ("AWS_KEY", _AWS_KEY, "<AWS_KEY>"),
    ("API_KEY", _API_KEY, "<API_KEY>"),
    ("EMAIL", _EMAIL, "<EMAIL>"),
    ("CREDIT_CARD", _CARD, _card),
    ("IP_ADDRESS", _IPV4, "<IP_ADDRESS>"),
    ("PHONE", _PHONE, "<PHONE>"),
)


def scrub(text: str) -> tuple[str, Counter[str]]:
    """`text` with every PII match replaced by its placeholder, and how many of each type
    were replaced."""
    found: Counter[str] = Counter()
    for kind, pattern, replacement in _RULES:

        def replace(match: re.Match[str], kind: str = kind, rule: object = replacement) -> str:
            new = rule if isinstance(rule, str) else rule(match)  # type: ignore[operator]
            if new is None:
                return match.group()
            found[kind] += 1
            return str(new)

        text = pattern.sub(replace, text)
    return text, found
