"""The node's configuration: one TOML file, validated before anything starts.

Every error names the file, the key and what is wrong, because the person
reading it is an administrator at a console, not the author of this module.
Environment variables ``DICOM_NODE_<SECTION>__<KEY>`` override file values so
that containers and service managers can change a port or a path without
editing the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import tomllib
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

ENV_PREFIX = "DICOM_NODE_"
DEFAULT_CONFIG_PATH = Path("config/node.toml")


H = TypeVar("H", bound=Hashable)


def first_repeated(values: Iterable[H]) -> H | None:
    """The first value that stands a second time (None: each stands once): for validators of names or numbers
    that must be unique, so the message can name the one to change."""
    seen: set[H] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


class ConfigError(Exception):
    """A configuration problem, worded for the person who has to fix it."""


def _check_ae_title(value: str) -> str:
    """AE titles are 1-16 characters of the DICOM default repertoire, no backslash."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty or only spaces")
    if len(value) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {value!r} has {len(value)}")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError(f"{value!r} contains a backslash or a control/non-ASCII character")
    return stripped


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `prot = 104` must not be ignored.
    # Environment values are read as TOML, so a token or AE title of digits arrives as a number: keep it a string.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class NodeSection(_Section):
    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("var")
    #: Largest PDU we accept. Large PDUs mean fewer Python-level loops per
    #: instance; 0 means unlimited (DICOM PS3.8 allows it).
    max_pdu: int = Field(1_048_576, ge=0)
    max_associations: int = Field(32, ge=1, le=1024)
    acse_timeout: float = Field(30.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    #: Refuse new instances (0xA700) while the storage filesystem has less free space.
    min_free_mb: int = Field(1024, ge=0)
    #: What to do when an instance with a known SOP Instance UID arrives again.
    duplicates: Literal["keep_first", "overwrite"] = "keep_first"
    #: Take abstract syntaxes that are no standard SOP class (private, or newer than this node) as
    #: storage classes; false refuses them at negotiation.
    accept_unknown_sop_classes: bool = True
    #: Connections that have not yet been accepted as an association, in all and per peer address;
    #: more are closed at once (a flood of idle connections must not starve real senders).
    max_pending_connections: int = Field(64, ge=1, le=4096)
    max_pending_per_address: int = Field(16, ge=1, le=4096)
    #: Processes that receive on the DICOM port (sharing it: SO_REUSEPORT); the first one also runs the
    #: rules, jobs, forwarding and the web server. See docs/scale-out.md.
    processes: int = Field(1, ge=1, le=64)
    #: Seconds a node process may go without its heartbeat before the other processes on the same index
    #: take over its running jobs, deliveries in flight and series waiting for stability.
    lease: float = Field(30.0, ge=3, le=3600)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, v: int) -> int:
        if 0 < v < 4096:
            raise ValueError("must be 0 (unlimited) or at least 4096 bytes")
        return v


class PeerSection(_Section):
    """One allowed caller: an AE title and, optionally, the hosts it may call from."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for h in hosts:
            try:
                ipaddress.ip_network(h, strict=False)
            except ValueError:
                raise ValueError(f"{h!r} is not an IP address or network (e.g. 10.1.2.3 or 10.1.0.0/16)") from None
        return hosts


class AccessSection(_Section):
    #: Empty means any calling AE title is accepted (logged at start-up).
    allowed_peers: list[PeerSection] = Field(default_factory=list)
    #: Reject associations whose Called AE Title is not ours.
    check_called_ae: bool = True


class TlsSection(_Section):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    #: CA bundle for verifying client certificates; set it to require them.
    client_ca: Path | None = None

    @model_validator(mode="after")
    def _files(self) -> TlsSection:
        if self.enabled:
            for key in ("certificate", "private_key"):
                if getattr(self, key) is None:
                    raise ValueError(f"TLS is enabled but {key} is not set")
        return self


class DatabaseSection(_Section):
    #: SQLAlchemy URL; empty means SQLite at <data_dir>/index.sqlite.
    url: str = ""


_SYNTAX_NAMES = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "deflate": "1.2.840.10008.1.2.1.99",
}


class RetrySection(_Section):
    """How deliveries to one destination are retried after a transient failure (refused, reset, 0xA7xx...).

    The n-th consecutive failure waits ``initial_delay * multiplier**(n-1)`` seconds, at most
    ``max_delay``, give or take ``jitter`` (a fraction) so that many nodes do not retry in step.
    """

    initial_delay: float = Field(5.0, ge=0)
    max_delay: float = Field(600.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.2, ge=0, le=1)
    #: A delivery still failing transiently this long after it was queued fails for good (0 = never).
    give_up_after: float = Field(72 * 3600.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> RetrySection:
        if self.initial_delay > self.max_delay:
            raise ValueError(f"initial_delay ({self.initial_delay}) is larger than max_delay ({self.max_delay})")
        return self


class DestinationTlsSection(_Section):
    enabled: bool = False
    #: CA bundle to verify the destination's certificate (empty: the system's).
    ca: Path | None = None
    #: Our client certificate and key, for destinations that require one.
    certificate: Path | None = None
    private_key: Path | None = None
    #: Check that the certificate names ``host``.
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> DestinationTlsSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("set both certificate and private_key, or neither")
        return self


class DestinationSection(_Section):
    name: str
    #: "dimse": C-STORE to ae_title at host:port; "dicomweb": STOW-RS to url.
    type: Literal["dimse", "dicomweb"] = "dimse"
    #: Required for type = "dimse".
    ae_title: str = Field("", validate_default=True)
    host: str = Field("", validate_default=True)
    port: int = Field(0, ge=0, le=65535, validate_default=True)
    #: type = "dicomweb": the DICOMweb base URL (instances are POSTed to <url>/studies), e.g.
    #: "https://pacs.example.org/dicom-web".
    url: str = ""
    #: type = "dicomweb": a bearer token (Authorization: Bearer ...), or username and password for HTTP Basic.
    token: str = ""
    username: str = ""
    password: str = ""
    #: Our AE title towards this destination (default: [node] ae_title).
    calling_ae_title: str | None = None
    #: Associations open to it at the same time (each sends many instances).
    max_associations: int = Field(2, ge=1, le=32)
    #: How instances are sent: "as-stored" (decompressed only if the destination refuses the stored
    #: syntax), "none" (always uncompressed), or lossless "jpeg2000" / "rle" (re-encoded if the
    #: destination accepts it, else as stored or uncompressed).
    transfer_syntax: Literal["as-stored", "none", "jpeg2000", "rle"] = "as-stored"
    #: Only these transfer syntaxes are proposed (UIDs or explicit, implicit, jpeg2000, rle,
    #: jpeg-lossless, jpeg-ls, deflate); empty: whatever the destination accepts.
    accepted_transfer_syntaxes: list[str] = Field(default_factory=list)
    #: How derived objects (SEG, SC) meant for this destination are encoded: uncompressed, or
    #: lossless JPEG 2000 / RLE. A rule action's own `compression` takes precedence.
    derived_compression: Literal["none", "jpeg2000", "rle"] = "none"
    #: Label map SEGs (Label Map Segmentation Storage, 2024) for this destination: "auto" asks it at
    #: association negotiation whether it accepts that SOP class and sends the same segments as a BINARY
    #: SEG when it does not (or cannot be asked); "send" always sends the label map; "binary" never does.
    label_map_seg: Literal["auto", "send", "binary"] = "auto"
    #: Seconds to wait for the association, each response and any network activity.
    timeout: float = Field(60.0, gt=0)
    #: Largest PDU we accept from it (0 = unlimited).
    max_pdu: int = Field(0, ge=0)
    #: Ask for Storage Commitment (N-ACTION); a delivery then counts only once the PACS confirms it.
    storage_commitment: bool = False
    #: Seconds to wait for the confirmation before the instances are sent (and committed) again.
    commitment_timeout: float = Field(600.0, gt=0)
    retry: RetrySection = Field(default_factory=RetrySection)
    tls: DestinationTlsSection = Field(default_factory=DestinationTlsSection)

    @field_validator("ae_title", "host", "port", mode="after")
    @classmethod
    def _dimse(cls, v: Any, info: ValidationInfo) -> Any:
        if info.data.get("type") == "dimse" and not v:
            raise ValueError('required for a destination of type "dimse"')
        return _check_ae_title(v) if info.field_name == "ae_title" and v else v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", v):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _by_type(self) -> DestinationSection:
        if self.type == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if not getattr(self, k)]
            if missing:
                raise ValueError(f'{", ".join(missing)} required for a destination of type "dimse" ({self.name!r})')
            if self.url:
                raise ValueError(f'url is for type = "dicomweb"; destination {self.name!r} is "dimse"')
        else:
            if not self.url:
                raise ValueError(f'url required for a destination of type "dicomweb" ({self.name!r})')
            dimse_only = sorted(
                self.model_fields_set
                & {
                    "storage_commitment",
                    "commitment_timeout",
                    "transfer_syntax",
                    "accepted_transfer_syntaxes",
                    "max_pdu",
                    "calling_ae_title",
                }
            )
            if dimse_only:
                raise ValueError(
                    f'{", ".join(dimse_only)}: DIMSE settings, not for destination {self.name!r} of type "dicomweb"'
                )
            if self.token and (self.username or self.password):
                raise ValueError(f"give token or username/password for destination {self.name!r}, not both")
        return self

    @field_validator("calling_ae_title")
    @classmethod
    def _calling(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)

    @field_validator("accepted_transfer_syntaxes")
    @classmethod
    def _syntaxes(cls, values: list[str]) -> list[str]:
        out = []
        for v in values:
            uid = _SYNTAX_NAMES.get(v.lower(), v)
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid):
                names = ", ".join(_SYNTAX_NAMES)
                raise ValueError(f"{v!r} is neither a transfer syntax UID nor one of {names}")
            out.append(uid)
        return out


class TrackerSection(_Section):
    """When a series counts as complete."""

    #: Seconds without a new instance after which a series is stable (a rule may override it).
    stable_after: float = Field(60.0, gt=0, le=86400)
    #: Complete a series as soon as its expected size has arrived, when its first
    #: instance tells it (ImagesInAcquisition, an enhanced multi-frame instance, ...).
    use_expected_counts: bool = True


class JobsSection(_Section):
    #: Jobs run at the same time.
    workers: int = Field(2, ge=1, le=64)
    #: Seconds before a failed job's first retry; doubles on each further attempt.
    retry_delay: float = Field(30.0, ge=0)


_PLUGIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_PLACEHOLDER = re.compile(r"\{(\w*)\}")


class WarmSettings(_Section):
    """How long the worker processes of a plugin environment live (see docs/plugins.md, "Warm workers")."""

    #: Workers per plugin kept started (setup done) even when idle, so the first job finds one ready.
    keep_warm: int = Field(0, ge=0, le=64)
    #: A worker is replaced after this many jobs (0: never): a model that leaks memory stays bounded.
    max_jobs_per_worker: int = Field(0, ge=0)
    #: Seconds an idle worker beyond keep_warm lives before it is stopped.
    idle_timeout: float = Field(600.0, gt=0)
    #: Seconds a worker may take to start and run the plugin's setup() (loading weights).
    setup_timeout: float = Field(600.0, gt=0)


class EnvironmentSection(WarmSettings):
    """A Python environment of its own (a venv, a conda env) whose plugins run in warm worker processes."""

    #: Its interpreter, e.g. "/opt/envs/nnunet/bin/python"; dicom-node-sdk must be installed in it.
    python: str
    #: Extra environment variables of its processes (e.g. nnUNet_results, TOTALSEG_HOME_DIR, PYTHONPATH).
    env: dict[str, str] = Field(default_factory=dict)
    #: Per plugin of this environment: its own keep_warm / max_jobs_per_worker / idle_timeout / setup_timeout.
    plugins: dict[str, WarmSettings] = Field(default_factory=dict)

    @field_validator("python")
    @classmethod
    def _python(cls, v: str) -> str:
        p = Path(v).expanduser()
        if not p.is_absolute():
            raise ValueError(f"{v!r}: give the interpreter's absolute path, e.g. /opt/envs/NAME/bin/python")
        if not p.exists():
            raise ValueError(f"{v} does not exist")
        if not os.access(p, os.X_OK):
            raise ValueError(f"{v} is not executable")
        return str(p)

    def warm(self, plugin: str) -> WarmSettings:
        """The settings that hold for ``plugin``: the keys its own table sets, the environment's for the rest."""
        own = self.plugins.get(plugin)
        values = {k: getattr(self, k) for k in WarmSettings.model_fields}
        if own is not None:
            values.update({k: getattr(own, k) for k in own.model_fields_set})
        return WarmSettings(**values)


class LocalPlugin(_Section):
    """A local plugin that lives in a plugin environment: ``{ entry = "module:attr", environment = "NAME" }``."""

    entry: str
    environment: str | None = None


class CommandPlugin(BaseModel):
    """One ``[plugins.commands.NAME]`` table: a program or a container image run as a plugin (node.plugins.commands)."""

    model_config = ConfigDict(extra="forbid")

    #: The program and its arguments; "{input}" and "{output}" become the folders. With ``container``:
    #: the arguments given to the image (its entrypoint runs them).
    command: list[str] | None = None
    #: A container image, run with ``runtime`` (it must be on this machine already: nothing is pulled).
    container: str | None = None
    runtime: Literal["podman", "docker"] = "podman"
    #: "required": the job waits for a GPU; "optional": one is given when free; "none": never.
    gpu: Literal["none", "optional", "required"] = "none"
    #: What the command writes: DICOM objects, a label map with metainfo.json, or either ("auto").
    output: Literal["auto", "dicom", "labelmap"] = "auto"
    #: A dcmqi metainfo.json describing the label map's values, for commands that do not write one
    #: (read and checked when the rules are compiled: node.decide.compile).
    metainfo: Path | None = None
    version: str = "1.0"
    description: str = ""
    #: Extra environment variables of the command (in the container for an image).
    env: dict[str, str] = Field(default_factory=dict)
    #: mercure module settings: written to task.json ("process" > "settings") in the input folder.
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or not v[0].strip():
            raise ValueError('give the program and its arguments, e.g. ["/opt/tool/run.sh", "{input}", "{output}"]')
        for arg in v:
            for word in _PLACEHOLDER.findall(arg):
                if word not in ("input", "output"):
                    raise ValueError(f"{arg!r}: {{{word}}} is not a placeholder; use {{input}} and {{output}}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _what_runs(self) -> CommandPlugin:
        if self.container is None:
            if self.command is None:
                raise ValueError('give command = ["/path/to/program", "{input}", "{output}"] or container = "image"')
            if "runtime" in self.model_fields_set:
                raise ValueError(f'runtime = "{self.runtime}" is for a container; this plugin runs a command')
            if shutil.which(self.command[0]) is None:
                where = "does not exist or is not executable" if "/" in self.command[0] else "is not on PATH"
                raise ValueError(f"command[0] = {self.command[0]!r} {where}")
        else:
            if not self.container.strip():
                raise ValueError('container = "": give the image, e.g. "localhost/totalseg:1"')
            if shutil.which(self.runtime) is None:
                other = "docker" if self.runtime == "podman" else "podman"
                raise ValueError(
                    f'runtime = "{self.runtime}": {self.runtime} is not on PATH; install it, or set runtime = "{other}"'
                )
        return self


class PluginsSection(_Section):
    #: Local plugins: name = "python.module:attribute" (imported by the node), or
    #: name = { entry = "module:attribute", environment = "NAME" } (run in that environment).
    #: Installed ones come from entry points.
    local: dict[str, str | LocalPlugin] = Field(default_factory=dict)
    #: Folders the node's Python imports local plugin modules from (added to sys.path of the node, its
    #: fork server and job processes, and of ``dicom-node rules``/``plugins``): no PYTHONPATH needed.
    paths: list[Path] = Field(default_factory=list)
    #: Plugin processes running at the same time.
    workers: int = Field(2, ge=1, le=64)
    #: Wall-clock seconds a plugin job may take (a rule's action may set its own).
    timeout: float = Field(600.0, gt=0)
    #: Address-space limit of a plugin process in MB, 0 for none (a rule's action may set its own).
    #: For a plugin in an environment: the resident memory its worker may reach during a job.
    memory_limit_mb: int = Field(8192, ge=0)
    #: GPU devices jobs may be given (CUDA device ids, as CUDA_VISIBLE_DEVICES takes them); [] for none.
    gpus: list[str] = Field(default_factory=list)
    #: Python environments of their own, by name (see docs/plugins.md, "Plugin environments").
    environments: dict[str, EnvironmentSection] = Field(default_factory=dict)
    #: Programs and container images run as plugins, by name (see docs/plugins.md, "Command and container plugins").
    commands: dict[str, CommandPlugin] = Field(default_factory=dict)

    @field_validator("local")
    @classmethod
    def _targets(cls, local: dict[str, str | LocalPlugin]) -> dict[str, str | LocalPlugin]:
        for name, value in local.items():
            if not re.match(_PLUGIN_NAME, name):
                raise ValueError(f"plugin name {name!r}: use letters, digits, '-', '_' or '.'")
            target = value if isinstance(value, str) else value.entry
            mod, _, attr = target.partition(":")
            if not mod or not attr:
                raise ValueError(f'{name} = {target!r}: write it as "package.module:attribute"')
        return local

    @field_validator("paths")
    @classmethod
    def _paths(cls, paths: list[Path]) -> list[Path]:
        out = []
        for p in paths:
            if not p.is_dir():
                what = "is not a folder" if p.exists() else "does not exist"
                raise ValueError(f"{str(p)!r} {what} (list the folders your local plugin modules are in)")
            out.append(p.resolve())
        return out

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, gpus: list[str]) -> list[str]:
        for g in gpus:
            if not g.strip() or "," in g:
                raise ValueError(f'{g!r}: one device per entry, e.g. gpus = ["0", "1"]')
        if len(set(gpus)) != len(gpus):
            raise ValueError("a device is listed twice")
        return gpus

    @field_validator("environments", "commands")
    @classmethod
    def _names(cls, tables: dict[str, Any]) -> dict[str, Any]:
        for name in tables:
            if not re.match(_PLUGIN_NAME, name):
                raise ValueError(f"name {name!r}: use letters, digits, '-', '_' or '.'")
        return tables

    @model_validator(mode="after")
    def _known_environments(self) -> PluginsSection:
        for name, value in self.local.items():
            if (
                isinstance(value, LocalPlugin)
                and value.environment is not None
                and value.environment not in self.environments
            ):
                known = ", ".join(sorted(self.environments)) or "none is configured"
                raise ValueError(
                    f"local.{name}.environment = {value.environment!r} is not a "
                    f"[plugins.environments.NAME] table ({known})"
                )
        return self

    def local_entries(self, environment: str | None) -> dict[str, str]:
        """The local plugins of one environment (None: the node's own Python), name -> "module:attr"."""
        out = {}
        for name, value in self.local.items():
            env = None if isinstance(value, str) else value.environment
            if env == environment:
                out[name] = value if isinstance(value, str) else value.entry
        return out


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False
    #: Keep patient names and IDs out of the logs (they stay in the index and the audit table).
    redact_phi: bool = True


class WebUserSection(_Section):
    name: str = Field(min_length=1, max_length=64)
    #: A hash from `dicom-node web hash-password` ("pbkdf2_sha256$iterations$salt$hash"); never the password.
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not v.startswith("pbkdf2_sha256$") or v.count("$") != 3:
            raise ValueError('must be a hash made by "dicom-node web hash-password", not a password')
        return v


class WebSection(_Section):
    """The dashboard, the REST API, /metrics, /healthz and /readyz, on one HTTP port."""

    enabled: bool = True
    #: Loopback by default: open it to the network on purpose (and behind TLS termination).
    host: str = "127.0.0.1"
    #: 0 picks a free port (logged at start-up).
    port: int = Field(8080, ge=0, le=65535)
    #: "token": a bearer token (``token`` below, or one generated into <data_dir>/web-token);
    #: "users": local users (and the token, for scripts); "none": no authentication, only on purpose.
    auth: Literal["token", "users", "none"] = "token"
    token: str = Field("", repr=False)
    users: list[WebUserSection] = Field(default_factory=list)
    #: /metrics without authentication, for a Prometheus scraper (it carries no patient data).
    public_metrics: bool = True
    #: Minutes a dashboard login lasts without use.
    session_minutes: int = Field(480, ge=1)

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if v and len(v) < 16:
            raise ValueError("use at least 16 characters (or leave it empty for a generated one)")
        return v

    @model_validator(mode="after")
    def _users(self) -> WebSection:
        if self.auth == "users" and not self.users:
            raise ValueError('auth = "users" needs at least one [[web.users]] entry')
        return self


class RetentionKindSection(_Section):
    #: Delete after this many days since the series last changed; 0 keeps them by age.
    max_age_days: float = Field(0, ge=0)
    #: May be deleted (oldest first) when the disk is above the high watermark.
    by_watermark: bool = True


class RetentionSection(_Section):
    """Scheduled clean-up. Nothing with an undelivered delivery or an unfinished job is ever deleted."""

    enabled: bool = False
    #: Seconds between clean-up runs.
    interval: float = Field(3600.0, ge=10)
    #: Start deleting when the storage filesystem is this full (percent used); 0 turns it off.
    high_watermark: float = Field(0, ge=0, le=100)
    #: ... and stop once it is down to this.
    low_watermark: float = Field(0, ge=0, le=100)
    sources: RetentionKindSection = Field(default_factory=RetentionKindSection)
    outputs: RetentionKindSection = Field(default_factory=RetentionKindSection)
    #: Prior studies retrieved from a [[sources]] PACS for a job (kept while a job that asked for them runs).
    priors: RetentionKindSection = Field(default_factory=lambda: RetentionKindSection(max_age_days=7))
    #: Days to keep delivery rows of instances already deleted (their history); 0 keeps them.
    delivery_history_days: float = Field(90, ge=0)

    @model_validator(mode="after")
    def _marks(self) -> RetentionSection:
        if self.high_watermark and not (0 < self.low_watermark < self.high_watermark):
            raise ValueError(
                f"low_watermark ({self.low_watermark:g}) must be above 0 and below high_watermark "
                f"({self.high_watermark:g})"
            )
        return self


class SourceSection(_Section):
    """A PACS the node may query for a patient's prior studies (C-FIND) and retrieve them from (C-MOVE or C-GET).

    With ``retrieve = "move"`` the source sends the studies to the node's own AE title ([node] ae_title,
    the calling AE title here): it must know that AE with this node's host and port.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    #: "move": C-MOVE to this node's AE (the source opens associations to the node's DICOM port);
    #: "get": C-GET on the query's own association (no route back to the node needed).
    retrieve: Literal["move", "get"] = "move"
    #: Seconds to wait for the association and each C-FIND response.
    timeout: float = Field(30.0, gt=0)
    #: Seconds a whole retrieve of one study may take.
    retrieve_timeout: float = Field(600.0, gt=0)
    #: The first retry of a query or retrieve that failed (source down, refused) waits this long; each
    #: further one waits as long as the job has waited so far (doubling), at most ``max_retry_delay``.
    retry_delay: float = Field(10.0, gt=0)
    max_retry_delay: float = Field(600.0, gt=0)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class QrSection(_Section):
    """The Query/Retrieve SCP (C-FIND, C-MOVE, C-GET) on the node's DICOM port."""

    #: Answer C-FIND, C-MOVE and C-GET (Patient Root and Study Root) from the index.
    enabled: bool = True
    #: A C-FIND matching more than this many entries is refused (0xA700: narrow the query); 0 = no limit.
    max_results: int = Field(10000, ge=0)
    #: Seconds a C-MOVE waits for its deliveries; what is still queued then is reported failed in the
    #: C-MOVE response (and stays in the durable queue, delivered later).
    move_timeout: float = Field(600.0, gt=0)
    #: Queue priority of the deliveries a C-MOVE makes (rules' forward actions default to 0).
    move_priority: int = Field(10, ge=-100, le=100)


class Config(_Section):
    node: NodeSection = Field(default_factory=NodeSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    access: AccessSection = Field(default_factory=AccessSection)
    tls: TlsSection = Field(default_factory=TlsSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    tracker: TrackerSection = Field(default_factory=TrackerSection)
    jobs: JobsSection = Field(default_factory=JobsSection)
    plugins: PluginsSection = Field(default_factory=PluginsSection)
    destinations: list[DestinationSection] = Field(default_factory=list)
    #: PACS the node may ask for prior studies (a plugin action's ``priors = { from = "NAME", ... }``).
    sources: list[SourceSection] = Field(default_factory=list)
    web: WebSection = Field(default_factory=WebSection)
    qr: QrSection = Field(default_factory=QrSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    #: Rules are validated by the rule engine; here they are only tables.
    rules: list[dict[str, Any]] = Field(default_factory=list)

    #: Where the values came from, for messages; not a config key.
    source: str = Field("built-in defaults", exclude=True)
    #: The compiled rules (a node.decide.rules.RuleSet, set by node.decide.compile); not a config key.
    ruleset: Any = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_destinations(self) -> Config:
        name = first_repeated(d.name for d in self.destinations)
        if name is not None:
            raise ValueError(f"destination name {name!r} is used twice")
        return self

    @model_validator(mode="after")
    def _unique_sources(self) -> Config:
        name = first_repeated(src.name for src in self.sources)
        if name is not None:
            raise ValueError(f"source name {name!r} is used twice")
        return self

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir.resolve()

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.data_dir / 'index.sqlite'}"


def loc_to_key(loc: tuple[Any, ...]) -> str:
    """``('destinations', 0, 'port')`` -> ``destinations[0].port``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def error_text(e: Any, unknown_key: str | None = None) -> str:
    """One pydantic error as an administrator reads it: the message and, where useful, the value given.

    ``unknown_key`` replaces pydantic's wording for a key the model does not have.
    """
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "extra_forbidden" and unknown_key:
        msg = unknown_key
    got = e.get("input")
    shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    return msg + shown


def format_errors(source: str, errors: list[tuple[str, str]]) -> str:
    """The text of a ConfigError: the source, then one ``key: message`` line per problem."""
    return "\n".join([f"invalid configuration in {source}:"] + [f"  {key}: {text}" for key, text in errors])


def _validation_errors(source: str, err: ValidationError, env_keys: dict[str, str] | None = None) -> str:
    env_keys = env_keys or {}
    lines = []
    for e in err.errors():
        key = loc_to_key(tuple(e["loc"]))
        origin = f" [set by {env_keys[key]}]" if key in env_keys else ""
        text = error_text(e, "unknown key (check the spelling; see config/node.toml for the keys)")
        lines.append((key, text + origin))
    return format_errors(source, lines)


def _env_value(raw: str) -> Any:
    """Environment values are TOML values where they parse as one, else strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> list[str]:
    """Apply ``DICOM_NODE_<SECTION>__<KEY>`` variables to ``data`` in place."""
    applied = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        section, key = name[len(ENV_PREFIX) :].lower().split("__", 1)
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"environment variable {name}: [{section}] is not a table, it cannot take a key")
        target[key] = _env_value(raw)
        applied.append(name)
    return applied


def load_config(path: Path | str | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load, override and validate the configuration.

    Without ``path``, ``config/node.toml`` is used when present, else the
    built-in defaults (SQLite and files under ``var/``). The rules are only tables here:
    ``node.decide.compile`` checks them against the plugins and compiles them.
    """
    environ = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    source = "built-in defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    applied = apply_env_overrides(data, environ)
    env_keys = {name[len(ENV_PREFIX) :].lower().replace("__", ".", 1): name for name in applied}
    if applied:
        source += " + environment (" + ", ".join(applied) + ")"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_validation_errors(source, e, env_keys)) from None
    cfg.source = source
    return cfg
