"""PII detectors (regex tier): each candidate a regex finds is validated before it counts.

Validation is what keeps look-alikes out: card numbers must pass the Luhn check and carry a known
issuer prefix, IBANs the ISO 13616 mod-97 check and their country's length, phone numbers need an
international prefix, a national layout or a context word, dates of birth a context word, IP
addresses must parse and not read as a version string.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from keel.guardrails.base import TIER_REGEX, Finding, RailOptionError, option

__all__ = ["PII_TYPES", "PIIRail", "iban_valid", "luhn_valid", "resolve_overlaps"]


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# ISO 13616 lengths of the IBAN of each country (SWIFT IBAN registry)
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """An IBAN (no spaces, upper case) of the right length for its country whose mod-97 is 1."""
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    moved = iban[4:] + iban[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


_EMAIL = re.compile(r"(?<![\w.+%-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w@-])")  # fmt: skip
_CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")  # fmt: skip
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
_SSN_BARE = re.compile(r"(?<!\d)(?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4}(?!\d)")
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])")  # fmt: skip
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")  # fmt: skip
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
_PHONE = re.compile(r"(?<![\w+-])(?:\+|00)?\(?\d[\d ().-]{5,19}\d(?![\w])")
_MONTHS = "jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"  # fmt: skip
_DATE = re.compile(
    r"(?<![\d/.-])(?:"
    r"(?:0?[1-9]|[12]\d|3[01])[/.-](?:0?[1-9]|[12]\d|3[01])[/.-](?:19|20)\d\d"
    r"|(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
    rf"|(?:{_MONTHS})\.? (?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?,? (?:19|20)\d\d"
    rf"|(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)? (?:of )?(?:{_MONTHS})\.?,? (?:19|20)\d\d"
    r")(?![\d/.-]\d)",
    re.IGNORECASE,
)
_DOB_CONTEXT = re.compile(
    r"\b(?:born|birth|birthday|dob|d\.o\.b|b-day|bday|date of birth|geboren|né|née|nacido)\b", re.IGNORECASE
)
_PHONE_CONTEXT = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|call|fax|sms|text me|whatsapp|contact|reach me|ring|number is)\b",
    re.IGNORECASE,
)
_NOT_PHONE_CONTEXT = re.compile(
    r"(?:\b(?:order|invoice|case|ticket|ref|reference|sku|id|isbn|tracking|account|acct|po|serial)\b|#|\bno\.)\W{0,3}$",
    re.IGNORECASE,
)
_SSN_CONTEXT = re.compile(r"\b(?:ssn|social security|soc\.? sec)\b", re.IGNORECASE)
_VERSION_CONTEXT = re.compile(r"(?:\bv|version|release|build|ver\.?)\s*$", re.IGNORECASE)
_STREET = (
    r"street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|"
    r"parkway|pkwy|circle|cir|highway|hwy|square|sq"
)
_ADDRESS = re.compile(
    rf"(?<![\w#-])\d{{1,6}}[A-Za-z]? (?:[A-Z][a-z]+\.? ){{1,4}}(?:{_STREET})\b\.?"
    r"(?:,? (?:apt|apartment|suite|ste|unit|#) ?[\w-]{1,6})?"
    r"(?:,? [A-Z][a-z]+(?: [A-Z][a-z]+){0,2},? [A-Z]{2},? \d{5}(?:-\d{4})?)?",
    re.IGNORECASE,
)
# issuer prefixes of payment cards: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6(?:011|5|4[4-9]|2)|35|3(?:0[0-5]|[68])|5[06-8]|6\d)")  # fmt: skip
_CARD_LENGTHS = {"3": (14, 15, 16), "4": (13, 16, 19), "5": (16,), "2": (16,), "6": (16, 17, 18, 19)}


def _before(text: str, start: int, n: int) -> str:
    return text[max(0, start - n) : start]


def _emails(text: str) -> list[Finding]:
    if "@" not in text:
        return []
    return [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]


def _cards(text: str) -> list[Finding]:
    out = []
    for m in _CARD.finditer(text):
        raw = m.group()
        seps = {c for c in raw if not c.isdigit()}
        if len(seps) > 1:
            continue
        digits = raw.replace(" ", "").replace("-", "")
        if not 13 <= len(digits) <= 19 or not _CARD_PREFIX.match(digits):
            continue
        if len(digits) not in _CARD_LENGTHS.get(digits[0], ()):
            continue
        if seps and any(len(g) > 6 for g in re.split(r"[ -]", raw)):
            continue  # cards are written in groups of 4 (Amex 4-6-5); long runs are something else
        if luhn_valid(digits):
            out.append(Finding("card", m.start(), m.end()))
    return out


def _ibans(text: str) -> list[Finding]:
    out = []
    for m in _IBAN.finditer(text):
        compact = m.group().replace(" ", "")
        if iban_valid(compact):
            out.append(Finding("iban", m.start(), m.end()))
    return out


def _national_ids(text: str) -> list[Finding]:
    out = [Finding("us_ssn", m.start(), m.end()) for m in _SSN.finditer(text)]
    if _SSN_CONTEXT.search(text):
        for m in _SSN_BARE.finditer(text):
            if _SSN_CONTEXT.search(_before(text, m.start(), 40)):
                out.append(Finding("us_ssn", m.start(), m.end()))
    out += [Finding("uk_nino", m.start(), m.end()) for m in _NINO.finditer(text)]
    return out


def _ips(text: str) -> list[Finding]:
    out = []
    if "." in text:
        for m in _IPV4.finditer(text):
            if _VERSION_CONTEXT.search(_before(text, m.start(), 12)):
                continue
            out.append(Finding("ip_address", m.start(), m.end()))
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            cand = m.group().split("%", 1)[0]
            if cand.count(":") < 2 or len(cand) < 3:
                continue
            try:
                ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            out.append(Finding("ip_address", m.start(), m.end()))
    return out


def _phones(text: str) -> list[Finding]:
    out = []
    for m in _PHONE.finditer(text):
        raw = m.group().rstrip(" .-(")
        end = m.start() + len(raw)
        digits = re.sub(r"\D", "", raw)
        n = len(digits)
        if raw.count("(") != raw.count(")") or re.search(r"[ .-]{2,}", raw):
            continue
        intl = raw.startswith(("+", "00"))
        if not intl and _NOT_PHONE_CONTEXT.search(_before(text, m.start(), 16)):
            continue  # "order 555-123-4567", "case #464-87-570": an identifier that looks like a phone
        if intl:
            if raw.startswith("00"):
                digits = digits[2:]
                n -= 2
            if 8 <= n <= 15 and digits[0] != "0":
                out.append(Finding("phone", m.start(), end))
            continue
        if (
            "." in raw
            and re.fullmatch(r"\d{1,4}(?:\.\d{1,4}){2,}", raw)
            and not re.fullmatch(r"\d{3}\.\d{3}\.\d{4}", raw)
        ):
            continue  # 1.2.3 / 10.0.0.1: versions and addresses, not phones
        nanp = re.fullmatch(r"(?:1[ .-]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{4}", raw)
        if nanp:
            out.append(Finding("phone", m.start(), end))
            continue
        # national layouts elsewhere: a trunk 0 and separated groups (020 7946 0958, 06-12345678)
        national = re.fullmatch(r"0\d{1,4}(?:[ -]\d{2,4}){1,4}", raw) or re.fullmatch(r"\(0\d{1,4}\) ?\d{3,4}[ -]?\d{3,4}", raw)  # fmt: skip
        if national and 9 <= n <= 12:
            out.append(Finding("phone", m.start(), end))
            continue
        if 7 <= n <= 15 and _PHONE_CONTEXT.search(_before(text, m.start(), 32)):
            if not re.fullmatch(r"\d{4}-\d\d-\d\d", raw):  # a date after "call me on"
                out.append(Finding("phone", m.start(), end))
    return out


def _dobs(text: str) -> list[Finding]:
    if not _DOB_CONTEXT.search(text):
        return []
    return [
        Finding("date_of_birth", m.start(), m.end())
        for m in _DATE.finditer(text)
        if _DOB_CONTEXT.search(_before(text, m.start(), 48))
    ]


def _addresses(text: str) -> list[Finding]:
    return [Finding("address", m.start(), m.end()) for m in _ADDRESS.finditer(text)]


#: name -> detector, in priority order (an earlier type wins an overlap of equal length)
PII_TYPES: dict[str, Callable[[str], list[Finding]]] = {
    "email": _emails,
    "card": _cards,
    "iban": _ibans,
    "national_id": _national_ids,
    "ip_address": _ips,
    "phone": _phones,
    "date_of_birth": _dobs,
    "address": _addresses,
}
_DEFAULT_TYPES = ("email", "card", "iban", "national_id", "ip_address", "phone", "date_of_birth")


def resolve_overlaps(findings: list[Finding]) -> list[Finding]:
    """Keep one finding per stretch of text: the longest, then the earliest detected."""
    spans = [f for f in findings if f.spans_text]
    whole = [f for f in findings if not f.spans_text]
    ranked = sorted(enumerate(spans), key=lambda p: (-(p[1].end - p[1].start), p[0]))  # type: ignore[operator]
    kept: list[Finding] = []
    for _, f in ranked:
        assert f.start is not None and f.end is not None
        if all(f.end <= k.start or f.start >= k.end for k in kept):  # type: ignore[operator]
            kept.append(f)
    return sorted(kept, key=lambda f: f.start or 0) + whole


class PIIRail:
    """Personal data: emails, phones, payment cards, IBANs, national ids, IPs, dates of birth, addresses.

    Options: ``types`` (default: all but ``address``, which is US-style and looser).
    """

    tier = TIER_REGEX
    window = 128

    def __init__(self, options: dict[str, Any] | None = None, name: str = "pii") -> None:
        options = options or {}
        types = option(options, "types", list, list(_DEFAULT_TYPES))
        unknown = [t for t in types if t not in PII_TYPES]
        if unknown:
            raise RailOptionError(f"types: unknown PII type {unknown[0]!r} (known: {', '.join(PII_TYPES)})")
        self.name = name
        self._detectors = [PII_TYPES[t] for t in PII_TYPES if t in types]

    def scan(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        for detect in self._detectors:
            found += detect(text)
        return resolve_overlaps(found) if len(found) > 1 else found
