"""PII scrubbing: each kind is replaced by its typed placeholder, and look-alikes that are
not PII (versions, dates, order numbers, non-Luhn digit runs) are left alone."""

from __future__ import annotations

import pytest

from kubetrain_trainer.feedback.pii import luhn_ok, scrub

SCRUBBED = [
    ("write to bob.smith+news@example.co.uk today", "write to <EMAIL> today", "EMAIL"),
    ("call +1 415-555-0132 now", "call <PHONE> now", "PHONE"),
    ("call (415) 555-0132", "call <PHONE>", "PHONE"),
    ("call 415.555.0132.", "call <PHONE>.", "PHONE"),
    ("ring +44 20 7946 0958", "ring <PHONE>", "PHONE"),
    ("host 192.168.1.20.", "host <IP_ADDRESS>.", "IP_ADDRESS"),
    ("at 10.0.0.1:8080", "at <IP_ADDRESS>:8080", "IP_ADDRESS"),
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "CREDIT_CARD"),
    ("card 5500-0000-0000-0004", "card <CREDIT_CARD>", "CREDIT_CARD"),
    ("card 378282246310005", "card <CREDIT_CARD>", "CREDIT_CARD"),
    ("id AKIAIOSFODNN7EXAMPLE here", "id <AWS_KEY> here", "AWS_KEY"),
    ("key sk-proj-abcdefghijklmnopqrstuvwx1234", "key <API_KEY>", "API_KEY"),
    ("key sk-abcdefghijklmnopqrstuvwxyz0123", "key <API_KEY>", "API_KEY"),
    (
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
        "Authorization: Bearer <BEARER_TOKEN>",
        "BEARER_TOKEN",
    ),
    (
        "pem:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc\n"
        "-----END RSA PRIVATE KEY-----\ndone",
        "pem:\n<PRIVATE_KEY>\ndone",
        "PRIVATE_KEY",
    ),
    (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg (cut off)",
        "<PRIVATE_KEY>",
        "PRIVATE_KEY",
    ),
]

KEPT = [
    "version 1.2.3.4.5 of the tool",
    "released 2024-01-15 at 10:30",
    "order 1234567890123 shipped",  # 13 digits, fails the Luhn check
    "card-like 4111 1111 1111 1112",  # one digit off: fails the Luhn check
    "0000 0000 0000 0000",  # passes Luhn, but no card is all one digit
    "not an address: 256.1.1.1 or 1.2.3",
    "total $1,234,567.89",
    "extension 555-0132",
    "user@localhost and x@y",
    "skip-the-line and sk-short",
    "the bearer of bad news",
    "ISBN 978-3-16-148410-0",
    "AKIA is a prefix, AKIAshort is not a key",
    "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----",
    "matrix [[1, 2], [3, 4]] and 3.14159265358979",
]


@pytest.mark.parametrize(("text", "expected", "kind"), SCRUBBED)
def test_pii_is_replaced_by_its_typed_placeholder(text: str, expected: str, kind: str) -> None:
    out, found = scrub(text)
    assert out == expected
    assert found == {kind: 1}


@pytest.mark.parametrize("text", KEPT)
def test_look_alikes_are_not_scrubbed(text: str) -> None:
    assert scrub(text) == (text, {})


def test_several_kinds_in_one_text_are_all_counted() -> None:
    out, found = scrub("mail a@b.io or c@d.org from 8.8.8.8 with sk-abcdefghijklmnopqrstuvwx")
    assert out == "mail <EMAIL> or <EMAIL> from <IP_ADDRESS> with <API_KEY>"
    assert found == {"EMAIL": 2, "IP_ADDRESS": 1, "API_KEY": 1}


def test_luhn() -> None:
    assert luhn_ok("4111111111111111")
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")
