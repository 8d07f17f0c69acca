"""Personal data in text: find e-mails, phones, SSNs, card numbers, IPs and IBANs; mask them.

Each detector is a regular expression plus, where the format has one, a checksum (Luhn for
cards, mod-97 for IBANs, address parsing for IPs), so that a random 16-digit number is not a
card. Numbers without a checksum are read with the words around them, as Presidio does: "Fax:"
or "call me on" before a number makes it a phone, "zip" or "licence" makes it not one, a street
word after it makes it an address, and "SSN" admits an SSN written without separators.
Overlapping hits are resolved by type priority, then by length.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PII_TYPES = ("EMAIL", "IBAN", "CREDIT_CARD", "SSN", "IP", "PHONE")  # priority order

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"(?<![\w+-])\d(?:[ -]?\d){11,18}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
_SSN_LOOSE = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-?(?!00)\d{2}-?(?!0000)\d{4}(?![\w-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# International or national numbers: optional +country, optional (area) or (0) trunk prefix,
# groups split by space, dot or dash, optional extension; a bare run of digits.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{7,15}|\d{10,11}|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}"
    r"(?:[ .-]\d{2,8}){1,4})(?:[ ]?(?:x|ext\.?)[ ]?\d{1,5})?(?![\w])"
)
# The nearest of these words before a number says what it is; a phone word after it
# ("-Fax", " office") marks a phone too.
_NUMBER_CONTEXT = re.compile(
    r"\b(?:(?P<phone>phones?|tel|telephone|call|calling|fax|mobile|cell|desk|contact|reach|"
    r"text|sms|dial|registered|answering|messages?|number)|(?P<ssn>ssns?|social security)|"
    r"(?P<other>zip|postal|postcode|license|licence|passport|account|acct|routing|invoice|"
    r"order|tax|taxpayer|identification|id|itin|tin|ein))\b",
    re.IGNORECASE,
)
_PHONE_AFTER = re.compile(r"[ -]?(?:office|fax|mobile|cell|home|work)\b", re.IGNORECASE)
_STREET_AFTER = re.compile(
    r"(?:[ \t]+[\w.'-]+){0,3}?[ \t]+(?:st|street|ave|avenue|rd|road|dr|drive|ln|lane|blvd|"
    r"boulevard|way|ct|court|pl|place|suite|apt|terrace|square|parkway|highway|circle|"
    r"crescent|close)\b",
    re.IGNORECASE,
)
_YEAR_RANGE = re.compile(r"^(?:1[89]|20)\d\d[-/](?:1[89]|20)\d\d$")
_DATE_TIME = re.compile(r"^(?:19|20)\d\d[-./]\d\d[-./]\d\d")


@dataclass(frozen=True)
class PiiSpan:
    """One detected piece of personal data: `text[start:end]` is of `kind`."""

    kind: str
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, read as base 36, mod 97."""
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _card_ok(found: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", found.group())
    return 12 <= len(digits) <= 19 and luhn_valid(digits)


def _ip_ok(found: re.Match[str]) -> bool:
    try:
        ipaddress.ip_address(found.group())
    except ValueError:
        return False
    return True


def _number_context(text: str, start: int) -> str | None:
    """The kind ("phone", "ssn", "other") the nearest word in the 40 characters before names."""
    words = list(_NUMBER_CONTEXT.finditer(text, max(0, start - 40), start))
    named = [w for w in words if w.group().lower() != "number"]  # "licence number" is a licence
    return (named or words)[-1].lastgroup if words else None


def _phone_ok(found: re.Match[str]) -> bool:
    """A phone-shaped number that is not a date, year range, address or other labelled number.

    Unambiguous forms (a "+", an "(area)", or 8-15 digits in groups) pass unless the nearest
    context word names another kind of number; short (7-digit) or unseparated numbers need a
    phone word beside them.
    """
    text, start, end, match = found.string, found.start(), found.end(), found.group()
    number = re.split(r"x|ext", match)[0].rstrip(" .")
    digits = sum(c.isdigit() for c in number)
    if not 7 <= digits <= 15 or _DATE_TIME.match(match) or _YEAR_RANGE.match(number):
        return False
    context = "phone" if _PHONE_AFTER.match(text, end, end + 12) else _number_context(text, start)
    if context in ("ssn", "other"):
        return False
    marked = match[0] in "+("
    if not marked and _STREET_AFTER.match(text, end, end + 60):
        return False
    grouped = not number.isdigit() and (digits >= 8 or marked)
    return grouped or context == "phone"


_DETECTORS: dict[str, list[tuple[re.Pattern[str], Callable[[re.Match[str]], bool] | None]]] = {
    "EMAIL": [(_EMAIL, None)],
    "IBAN": [(_IBAN, lambda m: iban_valid(m.group()))],
    "CREDIT_CARD": [(_CARD, _card_ok)],
    "SSN": [(_SSN, None), (_SSN_LOOSE, lambda m: _number_context(m.string, m.start()) == "ssn")],
    "IP": [(_IPV4, _ip_ok), (_IPV6, lambda m: m.group().count(":") >= 2 and _ip_ok(m))],
    "PHONE": [(_PHONE, _phone_ok)],
}


def find_pii(text: str, kinds: Iterable[str] = PII_TYPES) -> list[PiiSpan]:
    """Non-overlapping PII spans in `text`, sorted by position."""
    wanted = set(kinds)
    unknown = wanted - set(PII_TYPES)
    if unknown:
        raise ValueError(f"unknown PII types {sorted(unknown)}; known: {', '.join(PII_TYPES)}")
    found: list[tuple[int, int, PiiSpan]] = []
    for priority, kind in enumerate(PII_TYPES):
        if kind not in wanted:
            continue
        for pattern, check in _DETECTORS[kind]:
            for m in pattern.finditer(text):
                if check is None or check(m):
                    found.append((priority, m.start() - m.end(), PiiSpan(kind, m.start(), m.end())))
    taken: list[PiiSpan] = []
    for _, _, span in sorted(found, key=lambda f: (f[0], f[1])):
        if all(span.end <= t.start or span.start >= t.end for t in taken):
            taken.append(span)
    return sorted(taken, key=lambda s: s.start)


def mask_pii(text: str, spans: list[PiiSpan]) -> str:
    """Replace each span with its typed placeholder, e.g. `<EMAIL>`."""
    out, last = [], 0
    for span in spans:
        out.append(text[last : span.start])
        out.append(f"<{span.kind}>")
        last = span.end
    out.append(text[last:])
    return "".join(out)
