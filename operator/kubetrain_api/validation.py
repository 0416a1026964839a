"""Validation of TrainingRun documents, shared by `kubetrain validate` and the operator.

Two layers, both reporting `FieldError(path, message)` with the wire (camelCase) path:

1. Structure: the pydantic models in strict mode (types, bounds, enums, patterns, unknown
   fields), which mirror the CRD schema the API server enforces.
2. Rules the Kubernetes 1.20 schema cannot express (no CEL there): cross-field constraints,
   caps, reserved env names, inline secrets, URI shapes. Each rule is a small function that
   yields errors; `check_rules` runs them all so a user sees every problem at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pydantic
import yaml

from kubetrain_api import contract, k8s_rules, placement
from kubetrain_api import v1alpha1 as api
from kubetrain_api.model_overrides import check_config_overrides
from kubetrain_api.routing import HEADER_NAME

_Model = TypeVar("_Model", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class FieldError:
    """One problem with a document, located by its field path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidSpec(ValueError):
    """A TrainingRun that cannot run; carries every error found."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@dataclass(frozen=True)
class Limits:
    """Caps an installation may tighten (the operator reads them from its settings)."""

    max_gpus_per_run: int = 512
    max_spec_bytes: int = 256 * 1024
    max_name_length: int = 40  # children append suffixes such as "-ray-worker-12"


# --------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------


class _K8sYamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float, as kubectl's YAML parser does (PyYAML's
    YAML 1.1 resolver wants a dot in the mantissa and would read a string)."""


_K8sYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class YamlLimits:
    """Bounds on what the YAML reader accepts, so that a hostile file cannot take the CLI's
    (or the webhook's) memory or stack: Kubernetes itself refuses requests over 3 MiB."""

    max_bytes: int = 1024 * 1024
    max_depth: int = 64
    max_documents: int = 100
    # Nodes of one document with every alias expanded: what json.dumps (and pydantic) walk
    # later; a "billion laughs" stream is a few hundred bytes with 10^9 expanded nodes.
    max_nodes: int = 100_000


class InvalidYaml(ValueError):
    """A stream the YAML reader refuses; the message names the problem (and the line)."""


def read_file(path: Path, limits: YamlLimits = YamlLimits()) -> bytes:
    """A YAML file's bytes, reading no more than the size limit (plus one byte to notice a
    larger file). OSError when it cannot be read."""
    with path.open("rb") as f:
        data = f.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise InvalidYaml(f"is larger than {limits.max_bytes} bytes")
    return data


def _decode(data: str | bytes, limits: YamlLimits) -> str:
    if isinstance(data, str):
        raw_size = len(data.encode("utf-8", "surrogatepass"))
        text = data
    else:
        raw_size = len(data)
        if b"\x00" in data:
            raise InvalidYaml("is binary (it contains NUL bytes), not a YAML text file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidYaml(
                f"is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start})"
            ) from None
    if raw_size > limits.max_bytes:
        raise InvalidYaml(f"is larger than {limits.max_bytes} bytes")
    if "\x00" in text:
        raise InvalidYaml("is binary (it contains NUL bytes), not a YAML text file")
    return text.removeprefix("\ufeff")


class _BoundedLoader(_K8sYamlLoader):
    """Counts, while composing, each document's depth and its size with aliases expanded
    (an alias costs the size of what it names), and stops at the limits."""

    yaml_limits = YamlLimits()

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, for anchored nodes

    def compose_document(self) -> Any:
        self._nodes = 0
        self._sizes = {}
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            anchored = self.anchors.get(event.anchor)
            node = super().compose_node(parent, index)
            if anchored is not None and id(anchored) not in self._sizes:
                # An alias inside its own anchor: a cycle, which JSON cannot hold.
                raise InvalidYaml(
                    f"has an alias *{event.anchor} inside its own anchor{_line(event)}"
                )
            self._count(self._sizes.get(id(anchored), 1), event)
            return node
        self._depth += 1
        start = self._nodes
        try:
            if self._depth > self.yaml_limits.max_depth:
                raise InvalidYaml(
                    f"nests deeper than {self.yaml_limits.max_depth} levels{_line(event)}"
                )
            self._count(1, event)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._sizes[id(node)] = self._nodes - start
        return node

    def _count(self, nodes: int, event: Any) -> None:
        self._nodes += nodes
        if self._nodes > self.yaml_limits.max_nodes:
            raise InvalidYaml(
                f"expands to more than {self.yaml_limits.max_nodes} values in one document "
                f"(aliases count as often as they are used){_line(event)}"
            )


def _line(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""


def load_documents(data: str | bytes, limits: YamlLimits = YamlLimits()) -> list[Any]:
    """All non-empty YAML documents of a (multi-document) stream, within `limits`.
    Raises InvalidYaml (a ValueError) with a one-line reason for anything it refuses:
    too large, too deep, too many documents or alias expansions, not UTF-8 text, or not
    YAML."""
    text = _decode(data, limits)
    loader_class = type("_Loader", (_BoundedLoader,), {"yaml_limits": limits})
    loader = None
    docs: list[Any] = []
    try:
        loader = loader_class(text)
        count = 0
        while loader.check_data():
            count += 1
            if count > limits.max_documents:
                raise InvalidYaml(f"has more than {limits.max_documents} documents")
            doc = loader.get_data()
            if doc is not None:
                docs.append(doc)
    except yaml.reader.ReaderError as exc:
        raise InvalidYaml(
            f"is not a YAML text file: it contains the control character "
            f"#x{exc.character:04x} at character {exc.position}"
        ) from None
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        raise InvalidYaml(f"is not valid YAML: {problem}{_mark(exc)}") from None
    except yaml.YAMLError as exc:
        raise InvalidYaml(f"is not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidYaml("nests too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


def _mark(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


# --------------------------------------------------------------------------------------
# Layer 1: structure (pydantic)
# --------------------------------------------------------------------------------------

_PATTERN_HINTS = {
    api.URI: "must be a URI with scheme " + ", ".join(f"{s}://" for s in api.URI_SCHEMES),
    api.DNS_LABEL: "must be a lowercase DNS label (a-z, 0-9 and '-', starting and ending "
    "with a letter or digit)",
    api.DNS_SUBDOMAIN: "must be a lowercase DNS-1123 subdomain (a-z, 0-9, '-' and '.', "
    "starting and ending with a letter or digit)",
    api.ENV_NAME: "must be a valid environment variable name",
    HEADER_NAME: "must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)",
}
# pydantic tags union branches in the location (e.g. `cpu.int`, `cpu.str`); we drop them.
_UNION_TAGS = {"int", "str", "float", "bool"}


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _UNION_TAGS:
            out += f".{part}" if out else str(part)
    return out


def _message(err: Mapping[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    simple = {
        "missing": "required",
        "extra_forbidden": "unknown field",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "model_type": "must be an object",
        "model_attributes_type": "must be an object",
        "dict_type": "must be an object",
        "list_type": "must be a list",
        "datetime_type": "must be an RFC 3339 date-time",
        "datetime_parsing": "must be an RFC 3339 date-time",
    }
    if kind in simple:
        return simple[kind]
    bounds = {
        "greater_than": ("must be > {gt}", "gt"),
        "greater_than_equal": ("must be >= {ge}", "ge"),
        "less_than": ("must be < {lt}", "lt"),
        "less_than_equal": ("must be <= {le}", "le"),
        "string_too_long": ("must be at most {max_length} characters", "max_length"),
        "string_too_short": ("must be at least {min_length} characters", "min_length"),
        "too_long": ("must have at most {max_length} items", "max_length"),
        "too_short": ("must have at least {min_length} items", "min_length"),
    }
    if kind in bounds:
        text = bounds[kind][0].format(**ctx)
        return text.replace(" 1 items", " 1 item")
    if kind == "string_pattern_mismatch":
        return _PATTERN_HINTS.get(ctx["pattern"], f"must match the pattern {ctx['pattern']}")
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"])


def _structural_errors(exc: pydantic.ValidationError) -> list[FieldError]:
    errors: dict[str, list[str]] = {}
    for err in exc.errors():
        path, message = _path(err["loc"]), _message(err)
        errors.setdefault(path, [])
        if message not in errors[path]:
            errors[path].append(message)
    # A union (int or string) fails on both branches: say it once, in words.
    return [
        FieldError(path, "must be an integer or a quantity string such as 16Gi")
        if set(msgs) == {"must be an integer", "must be a string"}
        else FieldError(path, "; ".join(msgs))
        for path, msgs in errors.items()
    ]


def parse(doc: Any, limits: Limits = Limits()) -> api.TrainingRun:
    """Parse and fully validate one TrainingRun document; raise InvalidSpec with every error."""
    run = parse_structure(doc, api.TrainingRun, api.KIND)
    errors = check_rules(run, limits)
    if errors:
        raise InvalidSpec(errors)
    return run


def parse_structure(doc: Any, model: type[_Model], kind: str) -> _Model:
    """Layer 1 for any kind: the header, then the model in strict mode. Raises InvalidSpec
    with every structural error."""
    if not isinstance(doc, Mapping):
        raise InvalidSpec([FieldError("(document)", "must be a YAML mapping")])
    header = [
        FieldError(key, f"must be {want}")
        for key, want in (("apiVersion", api.API_VERSION), ("kind", kind))
        if doc.get(key) != want
    ]
    if header:
        raise InvalidSpec(header)
    # Round-trip through JSON and validate strictly, so that "4" is not an integer here
    # when the API server would refuse it (YAML may hold datetimes, hence default=str).
    try:
        text = json.dumps(_string_keys(doc), default=str)
    except (RecursionError, ValueError):
        # A document that did not come through load_documents (the webhook's JSON body).
        error = FieldError("(document)", "nests too deeply or refers to itself")
        raise InvalidSpec([error]) from None
    try:
        return model.model_validate_json(text, strict=True)
    except pydantic.ValidationError as exc:
        raise InvalidSpec(_structural_errors(exc)) from None


def _string_keys(node: Any) -> Any:
    """YAML allows keys such as dates; JSON (and so the API server, which converts YAML to
    JSON) has string keys only. Spelled as text, they then fail as unknown fields."""
    if isinstance(node, Mapping):
        return {k if isinstance(k, str) else str(k): _string_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_string_keys(v) for v in node]
    return node


def validate_document(doc: Any, limits: Limits = Limits()) -> list[FieldError]:
    """Every error of one document; empty when it is a valid TrainingRun."""
    try:
        parse(doc, limits)
    except InvalidSpec as exc:
        return exc.errors
    return []


# --------------------------------------------------------------------------------------
# Layer 2: rules beyond the schema
# --------------------------------------------------------------------------------------

Rule = Callable[[api.TrainingRun, Limits], Iterator[FieldError]]

RESERVED_ENV = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES",
    }
)
RESERVED_ENV_PREFIXES = ("RAY_", "KUBETRAIN_", "TORCHELASTIC_")
# Names that say "this is a credential": their values must come from a Secret.
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.I
)
# Shapes of well-known credentials, wherever they appear.
_SECRET_VALUE = re.compile(
    r"(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}|xox[baprs]-[A-Za-z0-9-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY)"
)
_HF_ID = re.compile(r"^[A-Za-z0-9][-\w.]*/[-\w.]+(/.*)?$")


def _rule_name(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    name = run.metadata.name
    if not name:
        yield FieldError("metadata.name", "required")
    elif len(name) > limits.max_name_length:
        yield FieldError(
            "metadata.name",
            f"must be at most {limits.max_name_length} characters "
            "(child objects append suffixes to it)",
        )
    elif not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
        yield FieldError(
            "metadata.name",
            "must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
            "letter): it names the run's Services",
        )


def _rule_size(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    size = len(run.spec.model_dump_json(by_alias=True, exclude_none=True))
    if size > limits.max_spec_bytes:
        yield FieldError("spec", f"is {size} bytes; the limit is {limits.max_spec_bytes}")


def _uris(spec: api.TrainingRunSpec) -> Iterator[tuple[str, str, str]]:
    """(path, uri, what) for every URI field; `what` picks the builtin:// catalogue."""
    yield "spec.model.source", spec.model.source, "model"
    if spec.model.tokenizer:
        yield "spec.model.tokenizer", spec.model.tokenizer, "model"
    for i, src in enumerate(spec.data.sources):
        yield f"spec.data.sources[{i}].uri", src.uri, "dataset"
    for i, ds in enumerate(spec.evaluation.datasets):
        yield f"spec.evaluation.datasets[{i}].uri", ds.uri, "dataset"
    for path, uri in api.reward_models(spec):
        yield path, uri, "model"
    if spec.checkpoint.storage.uri:
        yield "spec.checkpoint.storage.uri", spec.checkpoint.storage.uri, "storage"
    if "://" in spec.checkpoint.resume:
        yield "spec.checkpoint.resume", spec.checkpoint.resume, "storage"


def _rule_uris(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    for path, uri, what in _uris(run.spec):
        yield from uri_errors(path, uri, what)


def uri_errors(path: str, uri: str, what: str) -> Iterator[FieldError]:
    """What is wrong with one URI the schema let through (credentials, `..`, the shape each
    scheme needs); `what` (model, dataset, storage) picks the builtin:// catalogue."""
    parts = urlsplit(uri)
    scheme, rest = parts.scheme, uri.split("://", 1)[1]
    if parts.username or parts.password:
        yield FieldError(path, "must not carry credentials; use spec.secrets")
    elif _has_dot_dot(rest):
        # The pods mount one claim and the credentials reach one bucket; `..` (however
        # spelled) would point the trainer outside of them.
        yield FieldError(path, "must not contain '..' path segments (percent-encoded too)")
    elif scheme == "hf" and not _HF_ID.match(rest):
        yield FieldError(path, "must be hf://ORG/NAME")
    elif scheme == "pvc" and not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$", rest):
        yield FieldError(path, "must be pvc://CLAIM/PATH with a lowercase claim name")
    elif scheme == "pvc" and _leaves_claim(uri):
        # The operator mounts only the named claim; `..` would reach another one.
        yield FieldError(path, "must be pvc://CLAIM/PATH with a PATH inside the claim")
    elif scheme in ("s3", "gs") and not re.match(r"^[a-z0-9][-a-z0-9._]{1,62}(/.*)?$", rest):
        yield FieldError(path, f"must be {scheme}://BUCKET/KEY")
    elif scheme == "file" and not rest.startswith("/"):
        yield FieldError(path, "must be an absolute path: file:///PATH")
    elif scheme == "builtin":
        known = {"model": api.BUILTIN_MODELS, "dataset": api.BUILTIN_DATASETS}.get(what, ())
        if rest not in known:
            choices = ", ".join(known) or "none here"
            yield FieldError(path, f"unknown built-in {what} {rest!r} (known: {choices})")


def _has_dot_dot(rest: str) -> bool:
    """Whether a URI's path has a `..` segment, also once percent-decoded (repeatedly, for
    `%252e`) and with backslashes read as separators."""
    for _ in range(4):
        if any(seg == ".." for seg in re.split(r"[/\\]", rest)):
            return True
        decoded = unquote(rest)
        if decoded == rest:
            return False
        rest = decoded
    return True  # still encoded after four rounds: nobody writes that by accident


def _leaves_claim(uri: str) -> bool:
    try:
        contract.pvc_path(uri, root="/")
    except ValueError:
        return True
    return False


def _rule_steps(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    hp = run.spec.hyperparameters
    if hp.epochs is None and hp.max_steps is None:
        yield FieldError("spec.hyperparameters.maxSteps", "set maxSteps or epochs")
    if hp.max_steps is not None and hp.schedule.warmup_steps >= hp.max_steps:
        yield FieldError(
            "spec.hyperparameters.schedule.warmupSteps",
            f"must be < maxSteps ({hp.max_steps})",
        )


def processes_per_worker(spec: api.TrainingRunSpec) -> int:
    """Training processes on each worker pod: as set, else one per GPU (1 on CPU)."""
    res = spec.resources
    if res.processes_per_worker is not None:
        return res.processes_per_worker
    return max(1, res.gpus_per_worker)


def data_parallel_size(spec: api.TrainingRunSpec) -> int:
    """Training processes (the world size): workers x processes per worker. The one
    derivation: the trainer's `config.resolve`, the batch rule and the worker pods' Ray
    slots (builders) use it."""
    return spec.resources.workers * processes_per_worker(spec)


def total_gpus(spec: api.TrainingRunSpec) -> int:
    """GPUs the run's workers request (0 on CPU)."""
    return spec.resources.workers * spec.resources.gpus_per_worker


def _rule_batch(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    hp = run.spec.hyperparameters
    dp = data_parallel_size(run.spec)
    per_step = hp.micro_batch_size * dp
    if hp.global_batch_size % per_step:
        yield FieldError(
            "spec.hyperparameters.globalBatchSize",
            f"must be a multiple of microBatchSize x data-parallel processes "
            f"({hp.micro_batch_size} x {dp} = {per_step})",
        )


def _rule_gpus(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    res, hp = run.spec.resources, run.spec.hyperparameters
    total = total_gpus(run.spec)
    if total > limits.max_gpus_per_run:
        yield FieldError(
            "spec.resources.gpusPerWorker",
            f"workers x gpusPerWorker = {total} GPUs, over this installation's cap of "
            f"{limits.max_gpus_per_run}",
        )
    ppw = res.processes_per_worker
    if res.gpus_per_worker > 0 and ppw is not None and ppw != res.gpus_per_worker:
        yield FieldError(
            "spec.resources.processesPerWorker",
            f"must equal gpusPerWorker ({res.gpus_per_worker}) on GPUs: one training "
            "process per GPU; leave it unset",
        )
    cpus = _whole_cpus(res.cpu_per_worker)
    if res.gpus_per_worker == 0 and cpus is not None and cpus < processes_per_worker(run.spec):
        yield FieldError(
            "spec.resources.processesPerWorker",
            f"{processes_per_worker(run.spec)} processes need at least as many whole CPUs "
            f"per worker (cpuPerWorker is {res.cpu_per_worker})",
        )
    if hp.precision == "fp16-mixed":
        # FSDP2 has no sharded loss scaler wired here; fp16 without one under- and
        # overflows gradients silently.
        yield FieldError(
            "spec.hyperparameters.precision",
            "fp16-mixed is not supported (it needs gradient loss scaling, which the "
            "trainer does not do); use bf16-mixed",
        )


def _whole_cpus(quantity: int | str) -> int | None:
    """Whole CPUs Ray schedules on a worker pod for a CPU quantity (4, "4", "1.5", "500m"),
    rounded down and at least 1 as the worker's `ray start --num-cpus`; None for unusual
    spellings."""
    text = str(quantity)
    try:
        value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return max(1, int(value))


def _rule_env(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    yield from _env_errors(run.spec.env, "spec.env")
    for role in ("head", "worker"):
        override: api.PodOverride = getattr(run.spec.pod_overrides, role)
        yield from _env_errors(override.env, f"spec.podOverrides.{role}.env")


def _env_errors(env: list[api.EnvVar], base: str) -> Iterator[FieldError]:
    seen: set[str] = set()
    for i, var in enumerate(env):
        path = f"{base}[{i}]"
        # The schema checked the characters; this adds the API server's `.`/`..` rule.
        for message in k8s_rules.check_env_name(var.name):
            yield FieldError(f"{path}.name", message)
        if var.value_from is not None:
            for ref_name in ("secret_key_ref", "config_map_key_ref"):
                ref = getattr(var.value_from, ref_name)
                if ref is not None:
                    wire = api.EnvVarSource.model_fields[ref_name].alias
                    yield from _key_errors(ref.key, f"{path}.valueFrom.{wire}.key")
        if var.name in RESERVED_ENV or var.name.startswith(RESERVED_ENV_PREFIXES):
            yield FieldError(f"{path}.name", f"{var.name} is reserved: kubetrain sets it")
        if var.name in seen:
            yield FieldError(f"{path}.name", f"duplicate variable {var.name}")
        seen.add(var.name)
        if (var.value is None) == (var.value_from is None):
            yield FieldError(path, "set exactly one of value and valueFrom")
        if var.value_from is not None:
            refs = [var.value_from.secret_key_ref, var.value_from.config_map_key_ref]
            if sum(r is not None for r in refs) != 1:
                yield FieldError(
                    f"{path}.valueFrom", "set exactly one of secretKeyRef and configMapKeyRef"
                )
        if var.value and (_SECRET_NAME.search(var.name) or _SECRET_VALUE.search(var.value)):
            # Never echo the value: the error itself ends up in events and logs.
            yield FieldError(
                f"{path}.value",
                "looks like an inline secret; put it in a Secret and use valueFrom.secretKeyRef",
            )


def _key_errors(key: str, path: str) -> Iterator[FieldError]:
    for message in k8s_rules.check_config_map_key(key):
        yield FieldError(path, message)


def _quantity_fields(spec: api.TrainingRunSpec) -> Iterator[tuple[str, int | str | None, bool]]:
    """(path, quantity, must be positive) of every quantity that reaches a pod or a claim,
    and the GPU memory the memory plan is judged against."""
    res = spec.resources
    yield "spec.resources.gpuMemory", res.gpu_memory, True
    yield "spec.resources.cpuPerWorker", res.cpu_per_worker, False
    yield "spec.resources.memoryPerWorker", res.memory_per_worker, False
    yield "spec.resources.sharedMemory", res.shared_memory, False
    yield "spec.resources.head.cpu", res.head.cpu, False
    yield "spec.resources.head.memory", res.head.memory, False
    yield "spec.serve.resources.cpu", spec.serve.resources.cpu, False
    yield "spec.serve.resources.memory", spec.serve.resources.memory, False
    pvc = spec.checkpoint.storage.pvc
    if pvc is not None:
        # A claim's storage request must be above zero.
        yield "spec.checkpoint.storage.pvc.size", pvc.size, True


def _rule_pod_fields(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    """What the API server checks when the operator creates the run's pods and claim, so a
    run that could never create them is refused up front (k8s_rules.py)."""
    spec, res = run.spec, run.spec.resources
    for path, quantity, positive in _quantity_fields(spec):
        if quantity is None:  # unset: the operator derives it (sharedMemory)
            continue
        for message in k8s_rules.check_quantity(quantity, positive=positive):
            yield FieldError(path, message)
    for key, value in res.node_selector.items():
        for message in k8s_rules.check_label_key(key):
            yield FieldError(f"spec.resources.nodeSelector.{key}", f"key {message}")
        for message in k8s_rules.check_label_value(value):
            yield FieldError(f"spec.resources.nodeSelector.{key}", f"value {message}")
    for i, toleration in enumerate(res.tolerations):
        wire = toleration.model_dump(by_alias=True, exclude_none=True)
        for field, message in k8s_rules.check_toleration(wire):
            yield FieldError(f"spec.resources.tolerations[{i}].{field}", message)
    hf = spec.secrets.hugging_face_token
    if hf is not None:
        yield from _key_errors(hf.key, "spec.secrets.huggingFaceToken.key")
    if spec.image is not None:
        for message in k8s_rules.check_image(spec.image):
            yield FieldError("spec.image", message)
    # The run's own metadata: the API server checks it on apply; `kubetrain validate` and
    # `kubetrain run` say the same.
    # Paths as the API server names them (the map, the key in the message).
    for key, message in k8s_rules.check_labels(run.metadata.labels or {}):
        yield FieldError("metadata.labels", f"{key!r}: {message}")
    for key, message in k8s_rules.check_annotations(run.metadata.annotations or {}):
        yield FieldError("metadata.annotations", f"{key!r}: {message}" if key else message)


def _rule_config_overrides(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    for key, message in check_config_overrides(run.spec.model.config_overrides):
        yield FieldError(f"spec.model.configOverrides.{key}", message)


# Where env lists live; their values have their own rule (_env_errors).
_ENV_PARENTS = ("spec", "spec.podOverrides.head", "spec.podOverrides.worker")


def _rule_no_secret_values(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    """Credential-shaped strings anywhere else in the spec (env has its own rule)."""
    spec = run.spec.model_dump(by_alias=True, exclude_none=True)
    yield from secret_value_errors(spec, "spec", skip_env_under=_ENV_PARENTS)


def secret_value_errors(
    node: Any, path: str, skip_env_under: tuple[str, ...] = ()
) -> Iterator[FieldError]:
    """Credential-shaped strings anywhere in a dumped spec; `env` lists under the paths in
    `skip_env_under` are left to their own rule."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not (key == "env" and path in skip_env_under):
                yield from secret_value_errors(value, f"{path}.{key}", skip_env_under)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from secret_value_errors(value, f"{path}[{i}]", skip_env_under)
    elif isinstance(node, str) and _SECRET_VALUE.search(node):
        yield FieldError(path, "looks like an inline secret; reference a Secret instead")


def _rule_data(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    spec = run.spec
    yield from _unique_names("spec.data.sources", [s.name for s in spec.data.sources])
    if spec.method == "instruction":
        for i, src in enumerate(spec.data.sources):
            if src.format not in ("chat", "prompt-response"):
                yield FieldError(
                    f"spec.data.sources[{i}].format",
                    "method instruction needs chat or prompt-response data",
                )
    pre = spec.data.preprocessing
    if pre.min_chars > pre.max_chars:
        yield FieldError("spec.data.preprocessing.minChars", "must be <= maxChars")


def _rule_method(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    """Preference and RL methods: the data formats each takes, its settings block, and
    the rewards' own fields."""
    spec = run.spec
    wanted = api.METHOD_FORMATS.get(spec.method)
    for i, src in enumerate(spec.data.sources):
        path = f"spec.data.sources[{i}].format"
        if wanted is not None and src.format not in wanted:
            yield FieldError(path, f"method {spec.method} needs {' or '.join(wanted)} data")
        elif wanted is None and src.format in api.PREFERENCE_FORMATS:
            takes = [m for m, formats in api.METHOD_FORMATS.items() if src.format in formats]
            yield FieldError(path, f"{src.format} data needs method {' or '.join(takes)}")
    for block in ("dpo", "kto", "grpo"):
        if getattr(spec, block) is not None and spec.method != block:
            yield FieldError(f"spec.{block}", f"applies to method {block}, not {spec.method}")
    if spec.method == "grpo" and spec.grpo is None:
        yield FieldError("spec.grpo", "method grpo needs its rewards: set spec.grpo.rewards")
    for i, reward in enumerate(spec.grpo.rewards if spec.grpo else []):
        yield from _reward_errors(f"spec.grpo.rewards[{i}]", reward)


# The field each reward type needs, and the fields it ignores (set by mistake otherwise).
_REWARD_FIELDS = {
    "exact-match": (),
    "regex": ("pattern",),
    "json-schema": ("json_schema",),
    "length": ("min_chars", "max_chars"),
    "model": ("model",),
}


def _reward_errors(path: str, reward: api.RewardSpec) -> Iterator[FieldError]:
    own = _REWARD_FIELDS[reward.type]
    for name in ("pattern", "json_schema", "min_chars", "max_chars", "model"):
        field = api.RewardSpec.model_fields[name].alias or name
        if getattr(reward, name) is not None and name not in own:
            yield FieldError(f"{path}.{field}", f"does not apply to reward type {reward.type}")
    if own and all(getattr(reward, name) is None for name in own):
        fields = " or ".join(api.RewardSpec.model_fields[n].alias or n for n in own)
        yield FieldError(
            f"{path}.{fields.split(' ')[0]}", f"reward type {reward.type} needs {fields}"
        )
    if reward.pattern is not None:
        try:
            re.compile(reward.pattern)
        except re.error as exc:
            yield FieldError(f"{path}.pattern", f"is not a regular expression: {exc}")
    if (reward.min_chars or 0) > (reward.max_chars or float("inf")):
        yield FieldError(f"{path}.minChars", "must be <= maxChars")


def _unique_names(path: str, names: list[str]) -> Iterator[FieldError]:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            yield FieldError(f"{path}[{i}].name", f"duplicate name {name!r}")
        seen.add(name)


_LABELLED_METRICS = ("accuracy", "precision", "recall", "f1")


def _rule_evaluation(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    ev = run.spec.evaluation
    yield from _unique_names("spec.evaluation.datasets", [d.name for d in ev.datasets])
    for i, metric in enumerate(ev.metrics):
        if metric == "reward" and run.spec.method != "grpo":
            yield FieldError(
                f"spec.evaluation.metrics[{i}]", "reward is the mean reward of method grpo"
            )
        elif metric in ("loss", "perplexity") and run.spec.method == "grpo":
            yield FieldError(
                f"spec.evaluation.metrics[{i}]",
                f"method grpo has no validation {metric}; evaluate reward (metrics: [reward])",
            )
    if not ev.datasets:
        for i, metric in enumerate(ev.metrics):
            if metric in _LABELLED_METRICS:
                yield FieldError(
                    f"spec.evaluation.metrics[{i}]",
                    f"{metric} needs a labelled set in spec.evaluation.datasets",
                )
    for i, ds in enumerate(ev.datasets):
        if ds.task == "preference" and (ds.labels or ds.scoring):
            field = "labels" if ds.labels else "scoring"
            yield FieldError(
                f"spec.evaluation.datasets[{i}].{field}",
                "a preference set compares each pair's chosen and rejected completions; "
                "it has no labels or scoring",
            )
        if ds.task == "classification" and not ds.labels:
            yield FieldError(
                f"spec.evaluation.datasets[{i}].labels", "classification needs its labels"
            )
        if ds.scoring in ("loglikelihood", "loglikelihood-normalized") and not ds.labels:
            yield FieldError(
                f"spec.evaluation.datasets[{i}].scoring",
                f"{ds.scoring} scores each of the dataset's labels; list them in labels "
                "or use generate",
            )
    names = [d.name for d in ev.datasets]
    for i, gate in enumerate(ev.gate):
        path = f"spec.evaluation.gate[{i}]"
        dataset, _, gate_metric = gate.metric.rpartition("/")
        if gate_metric not in ev.metrics:
            yield FieldError(f"{path}.metric", f"{gate_metric} is not in spec.evaluation.metrics")
        if dataset and dataset not in names:
            yield FieldError(
                f"{path}.metric",
                f"no evaluation dataset named {dataset!r} (spec.evaluation.datasets: "
                f"{', '.join(names) or 'none'})",
            )
        elif dataset and gate_metric not in _LABELLED_METRICS:
            yield FieldError(
                f"{path}.metric",
                f"{gate_metric} is computed on the validation split, not per dataset; "
                f"write {gate_metric!r}",
            )
        if gate.min is None and gate.max is None:
            yield FieldError(path, "set min, max or both")
        elif gate.min is not None and gate.max is not None and gate.min > gate.max:
            yield FieldError(f"{path}.min", "must be <= max")


def _rule_checkpoint(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    storage = run.spec.checkpoint.storage
    if (storage.pvc is None) == (storage.uri is None):
        yield FieldError("spec.checkpoint.storage", "set exactly one of pvc and uri")


def _rule_serve(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    auto = run.spec.serve.autoscaling
    if auto is not None and auto.min_replicas > auto.max_replicas:
        yield FieldError("spec.serve.autoscaling.minReplicas", "must be <= maxReplicas")


def _rule_failure_rules(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    for i, rule in enumerate(run.spec.run_policy.failure_rules):
        path = f"spec.runPolicy.failureRules[{i}]"
        if (rule.on_exit_codes is None) == (rule.on_reasons is None):
            yield FieldError(path, "set exactly one of onExitCodes and onReasons")
        codes = rule.on_exit_codes
        if codes is not None and len(set(codes.values)) != len(codes.values):
            yield FieldError(f"{path}.onExitCodes.values", "must be distinct")
        if codes is not None and codes.operator == "In" and 0 in codes.values:
            yield FieldError(f"{path}.onExitCodes.values", "0 is success; it cannot fail a run")
        if rule.on_reasons is not None and len(set(rule.on_reasons)) != len(rule.on_reasons):
            yield FieldError(f"{path}.onReasons", "must be distinct")


def _rule_placement(run: api.TrainingRun, limits: Limits) -> Iterator[FieldError]:
    """Scheduling fields, pod overrides and storage across nodes (placement.py)."""
    for path, message in placement.problems(run.spec):
        yield FieldError(path, message)


RULES: tuple[Rule, ...] = (
    _rule_name,
    _rule_size,
    _rule_uris,
    _rule_steps,
    _rule_batch,
    _rule_gpus,
    _rule_env,
    _rule_pod_fields,
    _rule_config_overrides,
    _rule_no_secret_values,
    _rule_data,
    _rule_evaluation,
    _rule_method,
    _rule_checkpoint,
    _rule_serve,
    _rule_failure_rules,
    _rule_placement,
)


def check_rules(run: api.TrainingRun, limits: Limits = Limits()) -> list[FieldError]:
    """Every violation of the rules the CRD schema cannot express."""
    return [error for rule in RULES for error in rule(run, limits)]


# --------------------------------------------------------------------------------------
# Updates
# --------------------------------------------------------------------------------------

# What may change while a run is active; everything else would silently diverge from the
# running cluster, so it is refused until the run finishes.
MUTABLE_WHILE_RUNNING = (
    "spec.runPolicy",
    "spec.serve",
)
# ... and while it is suspended (no pods): where its pods go, as Kueue changes it when it
# admits a suspended run. The next attempt is built with the new placement.
MUTABLE_WHILE_SUSPENDED = (
    *MUTABLE_WHILE_RUNNING,
    "spec.resources.nodeSelector",
    "spec.resources.tolerations",
    "spec.resources.priorityClassName",
    "spec.resources.queueName",
    "spec.resources.schedulerName",
    "spec.resources.workerAffinity",
    "spec.resources.workerTopologySpreadConstraints",
)


IMMUTABLE = "cannot change while the run is active"


def mutable_paths(suspended: bool) -> tuple[str, ...]:
    """The spec paths an active run may change; the rest is fixed until it finishes."""
    return MUTABLE_WHILE_SUSPENDED if suspended else MUTABLE_WHILE_RUNNING


def is_under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` is one of `prefixes` or inside one (`a.b` is under `a`, not `a.bc`)."""
    return any(path == p or path.startswith((f"{p}.", f"{p}[")) for p in prefixes)


def immutable_changes(
    old: api.TrainingRunSpec, new: api.TrainingRunSpec, *, suspended: bool = False
) -> list[FieldError]:
    """Fields changed between two specs that may not change while the run is active
    (`suspended`: the run has no pods, so placement may change too). Pure: the operator
    and the admission webhook both ask it."""
    changed: list[str] = []

    def diff(a: Any, b: Any, path: str) -> None:
        if a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                diff(a.get(key), b.get(key), f"{path}.{key}")
        else:
            changed.append(path)

    diff(old.model_dump(by_alias=True), new.model_dump(by_alias=True), "spec")
    allowed = mutable_paths(suspended)
    return [FieldError(path, IMMUTABLE) for path in changed if not is_under(path, allowed)]
