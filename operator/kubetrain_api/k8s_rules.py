"""The rules the Kubernetes API server (1.20, as apimachinery's `validation` package and
core/v1's pod validation) applies to the values kubetrain copies into pod specs, and the
image reference grammar the kubelet parses. Pure: the standard library only.

Each `check_*` returns the problems of one value as messages (empty: valid), so callers
(validation.py's rules, and any builder input such as pod template overrides) attach their
own field paths. The control-plane test tests/api/test_pod_fields.py checks that these
rules refuse what the API server refuses, and accept what it accepts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63
QUALIFIED_NAME_MAX = 63
CONFIG_MAP_KEY_MAX = 253
ANNOTATIONS_MAX_BYTES = 256 * 1024  # TotalAnnotationSizeLimitB
IMAGE_NAME_MAX = 255  # distribution/reference NameTotalLengthMax

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL_RE = re.compile(rf"^{_DNS1123_LABEL}$")
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_CONFIG_MAP_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")

TOLERATION_OPERATORS = ("Equal", "Exists")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def check_dns1123_label(value: str) -> list[str]:
    """A DNS-1123 label: names of Services, volumes, containers, namespaces."""
    errors = []
    if len(value) > DNS1123_LABEL_MAX:
        errors.append(f"must be no more than {DNS1123_LABEL_MAX} characters")
    if not _DNS1123_LABEL_RE.match(value):
        errors.append(
            "must be a lowercase DNS-1123 label (a-z, 0-9 and '-', starting and ending "
            "with a letter or digit)"
        )
    return errors


def check_dns1123_subdomain(value: str) -> list[str]:
    """A DNS-1123 subdomain: names of Secrets, ConfigMaps, PVCs, PriorityClasses,
    StorageClasses, ServiceAccounts."""
    errors = []
    if len(value) > DNS1123_SUBDOMAIN_MAX:
        errors.append(f"must be no more than {DNS1123_SUBDOMAIN_MAX} characters")
    if not _DNS1123_SUBDOMAIN_RE.match(value):
        errors.append(
            "must be a lowercase DNS-1123 subdomain (a-z, 0-9, '-' and '.', starting and "
            "ending with a letter or digit)"
        )
    return errors


def check_label_key(value: str) -> list[str]:
    """A qualified name `[prefix/]name`: label keys, annotation keys, toleration keys,
    node selector keys."""
    prefix, slash, name = value.rpartition("/")
    errors = []
    if slash and value.count("/") > 1:
        return ["must be a name with an optional DNS subdomain prefix and one '/'"]
    if slash:
        if not prefix:
            errors.append("prefix part must be non-empty")
        else:
            errors += [f"prefix part {e}" for e in check_dns1123_subdomain(prefix)]
    if not name:
        errors.append("name part must be non-empty")
        return errors
    if len(name) > QUALIFIED_NAME_MAX:
        errors.append(f"name part must be no more than {QUALIFIED_NAME_MAX} characters")
    if not _QUALIFIED_NAME_RE.match(name):
        errors.append(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character"
        )
    return errors


def check_label_value(value: str) -> list[str]:
    """A label value (also a node selector value, an Equal toleration's value)."""
    errors = []
    if len(value) > LABEL_VALUE_MAX:
        errors.append(f"must be no more than {LABEL_VALUE_MAX} characters")
    if not _LABEL_VALUE_RE.match(value):
        errors.append(
            "must be empty or consist of alphanumeric characters, '-', '_' or '.', and "
            "must start and end with an alphanumeric character"
        )
    return errors


def check_labels(labels: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key, message) for each problem of a label map."""
    out = [(k, f"key {e}") for k in labels for e in check_label_key(k)]
    out += [(k, f"value {e}") for k, v in labels.items() for e in check_label_value(v)]
    return out


def check_annotations(annotations: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key, message) for each problem of an annotation map; key "" for the total size."""
    # The API server checks annotation keys lowercased.
    out = [(k, f"key {e}") for k in annotations for e in check_label_key(k.lower())]
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        out.append(("", f"annotations are {size} bytes; the limit is {ANNOTATIONS_MAX_BYTES}"))
    return out


def _chdir_prefix(value: str) -> list[str]:
    if value in (".", ".."):
        return [f"must not be {value!r}"]
    if value.startswith(".."):
        return ["must not start with '..'"]
    return []


def check_env_name(value: str) -> list[str]:
    """An environment variable name (`my.env-name`, `MY_ENV.NAME`, `MyEnvName1`)."""
    errors = []
    if not _ENV_NAME_RE.match(value):
        errors.append(
            "must consist of letters, digits, '_', '-' or '.', and must not start with a digit"
        )
    return errors + _chdir_prefix(value)


def check_config_map_key(value: str) -> list[str]:
    """A key of a Secret or ConfigMap (also the file name it is mounted as)."""
    errors = []
    if len(value) > CONFIG_MAP_KEY_MAX:
        errors.append(f"must be no more than {CONFIG_MAP_KEY_MAX} characters")
    if not _CONFIG_MAP_KEY_RE.match(value):
        errors.append("must consist of alphanumeric characters, '-', '_' or '.'")
    return errors + _chdir_prefix(value)


# --------------------------------------------------------------------------------------
# Quantities
# --------------------------------------------------------------------------------------

# resource.Quantity's grammar: a signed decimal number and one suffix (binary SI, decimal
# SI, or a decimal exponent, which is an integer).
_QUANTITY_RE = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_SUFFIX = {
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
QUANTITY_HINT = "must be a Kubernetes quantity such as 4, 500m, 1.5, 16Gi or 1e9"


def parse_quantity(value: int | str) -> Decimal:
    """The value of a Kubernetes quantity; ValueError when the API server would not
    parse it. (It caps huge values instead of refusing them; so does not this.)"""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(QUANTITY_HINT)
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY_RE.match(value)
    if not match:
        raise ValueError(QUANTITY_HINT)
    suffix = match["suffix"] or ""
    try:
        number = Decimal(match["number"])
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return number.scaleb(int(suffix[1:]))
        return number * _SUFFIX[suffix]
    except (InvalidOperation, ValueError, OverflowError):
        raise ValueError(QUANTITY_HINT) from None


def check_quantity(value: int | str, *, positive: bool = False) -> list[str]:
    """A resource amount: a quantity that is not negative (positive: above zero, as a
    PersistentVolumeClaim's storage request must be)."""
    try:
        amount = parse_quantity(value)
    except ValueError as exc:
        return [str(exc)]
    if positive and amount <= 0:
        return ["must be greater than zero"]
    if amount < 0:
        return ["must be greater than or equal to 0"]
    return []


# --------------------------------------------------------------------------------------
# Tolerations
# --------------------------------------------------------------------------------------


def check_toleration(toleration: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for each problem of one toleration in core/v1's wire shape
    (key, operator, value, effect, tolerationSeconds)."""
    key = toleration.get("key") or ""
    operator = toleration.get("operator") or "Equal"
    value = toleration.get("value") or ""
    effect = toleration.get("effect") or ""
    seconds = toleration.get("tolerationSeconds")
    out: list[tuple[str, str]] = []
    if key:
        out += [("key", e) for e in check_label_key(key)]
    elif operator != "Exists":
        out.append(("operator", "must be Exists when key is empty (which tolerates every taint)"))
    if seconds is not None and effect != "NoExecute":
        out.append(("effect", "must be NoExecute when tolerationSeconds is set"))
    if operator == "Equal":
        out += [("value", e) for e in check_label_value(value)]
    elif operator == "Exists":
        if value:
            out.append(("value", "must be empty when operator is Exists"))
    else:
        out.append(("operator", f"must be one of {', '.join(TOLERATION_OPERATORS)}"))
    if effect and effect not in TAINT_EFFECTS:
        out.append(("effect", f"must be one of {', '.join(TAINT_EFFECTS)}"))
    return out


# --------------------------------------------------------------------------------------
# Image references
# --------------------------------------------------------------------------------------

# distribution/reference's grammar, which the kubelet parses the image with (the API
# server only refuses surrounding whitespace: a bad reference makes a pod that never
# starts, InvalidImageName).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_IMAGE_RE = re.compile(
    rf"^(?P<name>{_NAME})(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


def check_image(value: str) -> list[str]:
    """An image reference `[registry[:port]/]path[:tag][@digest]`, path in lowercase."""
    if value != value.strip() or not value:
        return ["must be a non-empty image reference without surrounding whitespace"]
    match = _IMAGE_RE.match(value)
    if not match:
        return [
            "must be an image reference such as registry.example.com:5000/team/trainer:1.2 "
            "or name@sha256:<digest> (repository path in lowercase)"
        ]
    if len(match["name"]) > IMAGE_NAME_MAX:
        return [f"repository name must be no more than {IMAGE_NAME_MAX} characters"]
    return []
