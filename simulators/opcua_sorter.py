"""OPC UA carton sorter simulator: a tilt-tray sorter with an induct scanner, on asyncua.

Owns the simulated sorter (a seeded plan of cartons, lane routing, divert confirmations,
jams), its OPC UA address space and server lifecycle (restart on the same port, namespace
reordering, security). It never imports ``edge_agent``: it is the yardstick the agent's OPC UA
connector is measured against.

Address space (all in namespace ``urn:acme:sorter``; string NodeIds are the dotted browse
path, e.g. ``ns=<idx>;s=Sorter1.Divert.Lane``; browse names carry the same namespace):

    Objects/Sorter1/Induct/{TrackingId: String, Barcode: String, Count: UInt32}
    Objects/Sorter1/Divert/{TrackingId: String, Lane: Int32, Disposition: Int32, Count: UInt32}
    Objects/Sorter1/State/{Running: Boolean, Jammed: Boolean, FaultCode: UInt16}
    Objects/Scanner1/LastRead/{Barcode: String, TrackingId: String, Count: UInt32,
                               NoRead: Boolean}

Within one induct or divert the fields are written before the Count, so a client that sees
a Count change can read consistent fields. Counts are never reset, not even by a restart,
so a client can tell how many confirmations it missed.

The consistent form: every induct, divert and scanner read is also an OPC UA event carrying
all its fields at once (custom event types, ``s=<Name>EventType`` in our namespace):

    Sorter1/Induct  emits InductedEventType        {TrackingId, Barcode, Count}
    Sorter1/Divert  emits DivertConfirmedEventType {TrackingId, Lane, Disposition, Count}
    Scanner1/LastRead emits ScannerReadEventType   {Barcode, TrackingId, NoRead, Count}

(``Count`` is the same counter as the variable; the event's ``Time`` is the device clock.)
Jams raise a BaseEventType event on Sorter1 (Message, Severity).

Realism, each a constructor switch, seeded, and on by default:

- ``timestamp_resolution_ms`` (1): SourceTimestamps are truncated to the millisecond, as
  many PLCs stamp them, so several writes (of one divert, or of two diverts) share one;
- ``clock_offset_secs`` (2.0) and ``clock_drift_ppm`` (50): the device clock that stamps
  SourceTimestamps and event ``Time`` is off the host's and drifts;
- exception-based pushes (every write is reported) with several changes per publish
  response at any real rate; or ``sampling_ms`` > 0: the server *samples* each variable on
  its own clock at that interval, so intermediate values are skipped and the variables of
  one divert can be reported in different publish responses (off by default: it is the
  inconsistent server that clients must be able to detect);
- the line runs from ``start()`` (with ``rate`` > 0), so cartons are inducted before any
  client subscribed; ``warmup_cartons`` inducts that many at once before serving;
- ``restart()`` stops the server mid-flow.

The ground truth (``ground_truth()``, plus ``diverts()`` / ``inducts()``: every
confirmation and induct with its counter value) is exact whatever the switches.

Divert/Lane is where the carton went: the destination lane (1..lanes) when sorted,
`REJECT_LANE` (0) for no_read, no_destination and lane_full, `NO_LANE` (-1) when it stays
on the loop (recirculated) or is lost. A recirculated carton gets one confirmation per pass.

Timing runs on a belt clock that stops while the sorter is jammed or its server is down
(restart), so a restart loses no confirmation: the line waits, like a PLC holding its
induct while the gateway reboots. `pause()` only closes the induct gate; cartons on the
belt still divert.

    async with SorterSim(rate=5, seed=1) as sim:        # port 0 = pick a free port
        print(sim.endpoint, sim.namespace_index)
        await sim.induct("T1", "BC1")                    # scripted carton, plain sorted
        await sim.restart(down_secs=1, reorder_namespaces=True)   # index 2 -> 3
        truth = sim.ground_truth()

    python -m simulators.opcua_sorter --port 4840 --rate 5 --seed 1 --security none
    # prints "READY sorter endpoint=opc.tcp://127.0.0.1:4840/ ns=2" (plus " cert=PATH" of the
    # DER server certificate with --security sign_encrypt), runs until SIGINT/SIGTERM

Everything binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import enum
import heapq
import hmac
import ipaddress
import json
import logging
import math
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("simulators.opcua_sorter")

NAMESPACE_URI = "urn:acme:sorter"
# Registered next to ours so that reordering moves our index (2 <-> 3).
DUMMY_NAMESPACE_URI = "urn:acme:sorter:dummy"
APPLICATION_URI = "urn:acme:sorter:server"
REJECT_LANE = 0
NO_LANE = -1
JAM_FAULT_CODE = 1001
TICK_SECS = 0.01
CERT_FILE = "sorter_server_cert.der"
# Custom event types: name -> [(property, VariantType)], emitted by the notifier object.
EVENT_TYPES: dict[str, list[tuple[str, ua.VariantType]]] = {
    "InductedEventType": [("TrackingId", ua.VariantType.String), ("Barcode", ua.VariantType.String),
                          ("Count", ua.VariantType.UInt32)],
    "DivertConfirmedEventType": [("TrackingId", ua.VariantType.String),
                                 ("Lane", ua.VariantType.Int32),
                                 ("Disposition", ua.VariantType.Int32),
                                 ("Count", ua.VariantType.UInt32)],
    "ScannerReadEventType": [("Barcode", ua.VariantType.String), ("TrackingId", ua.VariantType.String),
                             ("NoRead", ua.VariantType.Boolean), ("Count", ua.VariantType.UInt32)],
}
EVENT_NOTIFIERS = {"InductedEventType": "Sorter1.Induct", "DivertConfirmedEventType": "Sorter1.Divert",
                   "ScannerReadEventType": "Scanner1.LastRead"}
KEY_FILE = "sorter_server_key.pem"

Security = Literal["none", "sign_encrypt"]


class Disposition(enum.IntEnum):
    """Divert/Disposition codes, as the sorter PLC reports them."""

    SORTED = 0
    NO_READ = 1
    NO_DESTINATION = 2
    LANE_FULL = 3
    RECIRCULATED = 4
    LOST_MISTRACK = 5

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class DispositionMix:
    """Share of cartons per outcome; the rest are sorted on the first pass."""

    no_read: float = 0.03
    no_destination: float = 0.03
    lane_full: float = 0.03
    # Recirculated once or twice, then sorted.
    recirculated: float = 0.08
    lost_mistrack: float = 0.01

    def __post_init__(self) -> None:
        shares = {k: getattr(self, k) for k in self.__dataclass_fields__}
        bad = [f"{k}={v}" for k, v in shares.items() if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"shares must be within 0..1: {', '.join(bad)}")
        if sum(shares.values()) > 1.0:
            raise ValueError(f"disposition shares add up to {sum(shares.values())} > 1")


@dataclass(slots=True)
class Carton:
    """Ground truth for one carton: what the sorter was told and what happened to it."""

    index: int
    tracking_id: str
    barcode: str
    # False when the scanner reported a no-read (Induct/Barcode is then "").
    read: bool
    # Routed lane; None when the host had no destination or the barcode was not read.
    destination: int | None
    # Planned confirmations in order; the last one is final.
    plan: tuple[Disposition, ...]
    scripted: bool
    inducted_at: str
    dispositions: list[Disposition] = field(default_factory=list)
    lanes: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.dispositions) == len(self.plan)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tracking_id": self.tracking_id,
            "barcode": self.barcode,
            "read": self.read,
            "destination": self.destination,
            "final_lane": self.lanes[-1] if self.done else None,
            "final_disposition": self.dispositions[-1].label if self.done else None,
            "dispositions": [d.label for d in self.dispositions],
            "lanes": list(self.lanes),
            "planned": [d.label for d in self.plan],
            "done": self.done,
            "scripted": self.scripted,
            "inducted_at": self.inducted_at,
        }


# (folder, variable, VariantType, initial value); the order is the write order's basis.
VARIABLES: dict[str, tuple[ua.VariantType, Any]] = {
    "Sorter1.Induct.TrackingId": (ua.VariantType.String, ""),
    "Sorter1.Induct.Barcode": (ua.VariantType.String, ""),
    "Sorter1.Induct.Count": (ua.VariantType.UInt32, 0),
    "Sorter1.Divert.TrackingId": (ua.VariantType.String, ""),
    "Sorter1.Divert.Lane": (ua.VariantType.Int32, NO_LANE),
    "Sorter1.Divert.Disposition": (ua.VariantType.Int32, 0),
    "Sorter1.Divert.Count": (ua.VariantType.UInt32, 0),
    "Sorter1.State.Running": (ua.VariantType.Boolean, False),
    "Sorter1.State.Jammed": (ua.VariantType.Boolean, False),
    "Sorter1.State.FaultCode": (ua.VariantType.UInt16, 0),
    "Scanner1.LastRead.Barcode": (ua.VariantType.String, ""),
    "Scanner1.LastRead.TrackingId": (ua.VariantType.String, ""),
    "Scanner1.LastRead.Count": (ua.VariantType.UInt32, 0),
    "Scanner1.LastRead.NoRead": (ua.VariantType.Boolean, False),
}


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def generate_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    app_uri: str,
    common_name: str,
    days: int = 365,
) -> None:
    """Write a self-signed OPC UA application certificate (DER) and its key (PEM, no password).

    Valid for client and server use, for 127.0.0.1, localhost and this host's name, so the
    same helper makes the sorter's certificate and a test client's.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ACME simulators"),
    ])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(app_uri),
                x509.DNSName("localhost"),
                x509.DNSName(socket.gethostname()),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=True, key_encipherment=True,
                data_encipherment=True, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    key_path.chmod(0o600)


def _to_der(cert: Any) -> bytes | None:
    try:
        from cryptography.hazmat.primitives.serialization import Encoding

        return cert.public_bytes(Encoding.DER)
    except AttributeError:
        return None


class _TrustList:
    """Accepts a client application certificate only if it is one of the trusted files (read
    at each session, as a server's "trusted" folder): anything else is refused at
    CreateSession with BadCertificateUntrusted, as an asyncua server with a trust store does.
    (asyncua's own ``CertificateValidator``/``TrustStore`` verify chains to a CA, and a
    self-signed, non-CA application certificate never verifies against them.)"""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths  # the simulator's list: trusting a certificate later takes effect
        self.refused = 0  # sessions refused

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        trusted = set()
        for p in self.paths:
            data = p.read_bytes()
            if data.lstrip().startswith(b"-----BEGIN"):
                data = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
            trusted.add(data)
        if cert.public_bytes(serialization.Encoding.DER) not in trusted:
            self.refused += 1
            log.warning("refused a client certificate (%s, %s): not trusted",
                        cert.subject.rfc4514_string(), app.ApplicationUri)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)


class _SorterUserManager(UserManager):
    """Refuses sessions on an unencrypted channel when security is required, and checks
    username/password against the configured users when there are any.

    asyncua lets a client open a None secure channel (for GetEndpoints) even when no None
    endpoint is offered, and then activate a session on it; the channel's peer certificate
    (passed as `certificate` for anonymous and username tokens) is empty (b"" or None) only
    on such a channel, which is how we refuse it.
    """

    def __init__(self, users: Mapping[str, str], require_secure_channel: bool,
                 user_certificates: Sequence[bytes] = ()) -> None:
        self._users = dict(users)
        self._require_secure_channel = require_secure_channel
        self._user_certificates = set(user_certificates)  # DER of trusted X509 user tokens

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if self._require_secure_channel and not certificate:
            return None
        if username is None and self._user_certificates:
            der = certificate if isinstance(certificate, bytes) else _to_der(certificate)
            return User(role=UserRole.User, name="x509") if der in self._user_certificates else None
        if not self._users:
            return User(role=UserRole.User)
        if username is None or username not in self._users:
            return None
        given = (password or "").encode()
        if not hmac.compare_digest(given, self._users[username].encode()):
            return None
        return User(role=UserRole.User, name=username)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SorterSim:
    """A carton sorter served over OPC UA; see the module docstring for the node layout.

    Not thread-safe: use it from the event loop it was started on.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rate: float = 2.0,
        seed: int = 0,
        lanes: int = 24,
        travel_secs: float = 1.0,
        recirc_secs: float | None = None,
        jam_every: int = 0,
        jam_secs: float = 1.0,
        mix: DispositionMix | None = None,
        security: Security = "none",
        users: Mapping[str, str] | None = None,
        user_certificates: Sequence[Path] = (),
        trusted_client_certificates: Sequence[Path] | None = None,
        secure_policies: Sequence[str] = ("Basic256Sha256_SignAndEncrypt",),
        cert_dir: Path | str | None = None,
        ground_truth_path: Path | str | None = None,
        tracking_prefix: str = "S",
        timestamp_resolution_ms: float = 1.0,
        clock_offset_secs: float = 2.0,
        clock_drift_ppm: float = 50.0,
        sampling_ms: float = 0.0,
        events: bool = True,
        warmup_cartons: int = 0,
    ) -> None:
        """`rate` is cartons per second (0: scripted cartons only); `jam_every` jams the
        sorter after every N-th inducted carton for `jam_secs` (0: never); `users` maps
        username to password (empty: anonymous allowed); `cert_dir` holds the server
        certificate, generated on first start (default: a temporary directory removed by
        `stop`); `ground_truth_path` is written on `stop` and on every `restart`;
        `trusted_client_certificates` (with security "sign_encrypt"): the only client
        application certificates accepted, any other is refused at CreateSession with
        BadCertificateUntrusted (None, the default: any is accepted).
        `timestamp_resolution_ms` (0: full resolution), `clock_offset_secs`,
        `clock_drift_ppm`, `sampling_ms` (0: exception-based), `events` and
        `warmup_cartons`: see the module docstring."""
        errors = []
        if rate < 0:
            errors.append(f"rate must be >= 0, got {rate}")
        if lanes < 1:
            errors.append(f"lanes must be >= 1, got {lanes}")
        if travel_secs <= 0:
            errors.append(f"travel_secs must be > 0, got {travel_secs}")
        if jam_every < 0 or jam_secs < 0:
            errors.append("jam_every and jam_secs must be >= 0")
        if security not in ("none", "sign_encrypt"):
            errors.append(f"security must be 'none' or 'sign_encrypt', got {security!r}")
        if timestamp_resolution_ms < 0 or sampling_ms < 0 or warmup_cartons < 0:
            errors.append("timestamp_resolution_ms, sampling_ms and warmup_cartons must be >= 0")
        if errors:
            raise ValueError("; ".join(errors))
        self.host = host
        self.port = port
        self.rate = rate
        self.seed = seed
        self.lanes = lanes
        self.travel_secs = travel_secs
        self.recirc_secs = recirc_secs if recirc_secs is not None else 1.5 * travel_secs
        self.jam_every = jam_every
        self.jam_secs = jam_secs
        self.mix = mix or DispositionMix()
        self.security: Security = security
        self.users = dict(users or {})
        self.user_certificates = [Path(p).read_bytes() for p in user_certificates]
        # With security "sign_encrypt": the client application certificates trusted (DER or
        # PEM files), or None to accept any.
        self.trusted_client_certificates = (
            None if trusted_client_certificates is None
            else [Path(p) for p in trusted_client_certificates])
        self.client_trust: _TrustList | None = None
        # With security "sign_encrypt": the ua.SecurityPolicyType names offered (policy_mode).
        self.secure_policies = [getattr(ua.SecurityPolicyType, p) for p in secure_policies]
        self._cert_dir = Path(cert_dir) if cert_dir is not None else None
        self._tmp_cert_dir: Path | None = None
        self.ground_truth_path = Path(ground_truth_path) if ground_truth_path else None
        self.tracking_prefix = tracking_prefix
        self.timestamp_resolution_ms = timestamp_resolution_ms
        self.clock_offset_secs = clock_offset_secs
        self.clock_drift_ppm = clock_drift_ppm
        self.sampling_ms = sampling_ms
        self.events = events
        self.warmup_cartons = warmup_cartons
        self._clock_origin: float | None = None
        self._divert_log: list[dict[str, Any]] = []
        self._induct_log: list[dict[str, Any]] = []
        self._evgens: dict[str, Any] = {}
        # Sampled mode: per variable (value, device time of its last change, written?).
        self._staged: dict[str, tuple[Any, dt.datetime, bool]] = {}
        self._sampler: asyncio.Task[None] | None = None

        self._values: dict[str, Any] = {k: v for k, (_, v) in VARIABLES.items()}
        self._cartons: list[Carton] = []
        self._by_tracking: dict[str, Carton] = {}
        self._due: list[tuple[float, int, int]] = []  # (belt time, seq, carton index)
        self._due_seq = 0
        self._belt_t = 0.0
        self._next_induct_t = 0.0
        self._paused = False
        self._jammed_until: float | None = None  # loop time
        self._down = False
        self._dummy_first = False
        self._server: Server | None = None
        self._ns_idx: int | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # --- public API ----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/"

    @property
    def namespace_index(self) -> int:
        """Index of `NAMESPACE_URI` in the running server's namespace array."""
        if self._ns_idx is None:
            raise RuntimeError("the sorter is not started")
        return self._ns_idx

    @property
    def cert_dir(self) -> Path:
        if self._cert_dir is not None:
            return self._cert_dir
        if self._tmp_cert_dir is None:
            self._tmp_cert_dir = Path(tempfile.mkdtemp(prefix="opcua-sorter-"))
        return self._tmp_cert_dir

    @property
    def server_certificate_path(self) -> Path:
        """DER certificate a client must trust for ``security="sign_encrypt"``."""
        return self.cert_dir / CERT_FILE

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def jammed(self) -> bool:
        return self._jammed_until is not None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("already started")
        if self.port == 0:
            self.port = _free_port(self.host)
        for _ in range(self.warmup_cartons):  # inducted before anyone could subscribe
            await self._induct(self._plan_carton(len(self._cartons)))
        await self._start_server()
        await self._publish({"Sorter1.State.Running": True})
        self._task = asyncio.create_task(self._run(), name="opcua-sorter")
        if self.sampling_ms > 0:
            self._sampler = asyncio.create_task(self._sample(), name="opcua-sorter-sampler")

    async def stop(self) -> None:
        """Stop the line and the server; write the ground truth if a path was given."""
        for task in (self._task, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._sampler = None
        async with self._lock:
            await self._stop_server()
        self._write_ground_truth()
        if self._tmp_cert_dir is not None:
            shutil.rmtree(self._tmp_cert_dir, ignore_errors=True)
            self._tmp_cert_dir = None

    async def restart(self, down_secs: float = 0.0, reorder_namespaces: bool = False) -> None:
        """Stop the server, stay down `down_secs`, serve again on the same port.

        Carton state, counters and ground truth survive; the belt clock stands still while
        down. With `reorder_namespaces` the dummy namespace swaps places with ours, so our
        namespace index changes (2 <-> 3) and clients must re-resolve it by URI.
        """
        async with self._lock:
            self._down = True
            await self._stop_server()
        self._write_ground_truth()
        await asyncio.sleep(down_secs)
        if reorder_namespaces:
            self._dummy_first = not self._dummy_first
        async with self._lock:
            await self._start_server()
            self._down = False

    def pause(self) -> None:
        """Close the induct gate; cartons already on the belt still divert."""
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._next_induct_t = self._belt_t + self._induct_interval()

    async def induct(
        self,
        tracking_id: str,
        barcode: str,
        *,
        dispositions: Sequence[Disposition | int] = (Disposition.SORTED,),
        lane: int | None = None,
    ) -> Carton:
        """Induct a scripted carton now (even while paused or jammed).

        `dispositions` are its confirmations in order: zero or more RECIRCULATED then one
        final code. Its destination is `lane` or `lane_for(barcode)`; its Divert/Lane
        follows the rules in the module docstring.
        """
        plan = tuple(Disposition(d) for d in dispositions)
        if not plan or any(d is Disposition.RECIRCULATED for d in plan[-1:]):
            raise ValueError("dispositions must end with a final (non-recirculated) code")
        if any(d is not Disposition.RECIRCULATED for d in plan[:-1]):
            raise ValueError("only RECIRCULATED may come before the final disposition")
        if tracking_id in self._by_tracking:
            raise ValueError(f"tracking id {tracking_id!r} already inducted")
        read = plan[-1] is not Disposition.NO_READ
        if plan[-1] in (Disposition.NO_READ, Disposition.NO_DESTINATION):
            destination = None
        else:
            destination = lane if lane is not None else self.lane_for(barcode)
        carton = Carton(
            index=len(self._cartons), tracking_id=tracking_id, barcode=barcode, read=read,
            destination=destination, plan=plan, scripted=True, inducted_at=_now_iso(),
        )
        await self._induct(carton)
        return carton

    def lane_for(self, barcode: str) -> int:
        """The host's routing: a stable lane per barcode."""
        return zlib.crc32(barcode.encode()) % self.lanes + 1

    def ground_truth(self) -> list[dict[str, Any]]:
        """Every inducted carton, in induct order, as JSON-ready dicts."""
        return [c.to_json() for c in self._cartons]

    def carton(self, tracking_id: str) -> Carton:
        return self._by_tracking[tracking_id]

    def diverts(self) -> list[dict[str, Any]]:
        """Every divert confirmation in order: {count, tracking_id, lane, disposition}."""
        return list(self._divert_log)

    def inducts(self) -> list[dict[str, Any]]:
        """Every induct in order: {count, tracking_id, barcode, read}."""
        return list(self._induct_log)

    def device_time(self) -> dt.datetime:
        """The device clock: the host's, offset and drifting, truncated to the resolution."""
        now = time.time()
        if self._clock_origin is None:
            self._clock_origin = now
        t = now + self.clock_offset_secs + (now - self._clock_origin) * self.clock_drift_ppm * 1e-6
        res = self.timestamp_resolution_ms
        if res > 0:
            t = math.floor(t * 1000 / res) * res / 1000
        return dt.datetime.fromtimestamp(t, dt.UTC)

    def value(self, name: str) -> Any:
        """Current value of a variable by its dotted name, e.g. ``Sorter1.Divert.Count``."""
        return self._values[name]

    def write_ground_truth(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.ground_truth(), indent=1) + "\n")

    async def __aenter__(self) -> SorterSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- server --------------------------------------------------------------------

    async def _start_server(self) -> None:
        server = Server(user_manager=_SorterUserManager(
            self.users, require_secure_channel=self.security == "sign_encrypt",
            user_certificates=self.user_certificates))
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("ACME Sorter simulator")
        await server.set_application_uri(APPLICATION_URI)
        if self.security == "sign_encrypt":
            cert, key = self.server_certificate_path, self.cert_dir / KEY_FILE
            if not (cert.is_file() and key.is_file()):
                generate_certificate(cert, key, app_uri=APPLICATION_URI, common_name="ACME Sorter")
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
            server.set_security_policy(self.secure_policies)
            if self.trusted_client_certificates is not None:
                self.client_trust = _TrustList(self.trusted_client_certificates)
                server.set_certificate_validator(self.client_trust)
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        # With users, anonymous sessions are refused; without, nobody needs a password.
        if self.user_certificates:
            server.set_identity_tokens([ua.X509IdentityToken, ua.UserNameIdentityToken])
        elif self.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        if self._dummy_first:
            await server.register_namespace(DUMMY_NAMESPACE_URI)
            idx = await server.register_namespace(NAMESPACE_URI)
        else:
            idx = await server.register_namespace(NAMESPACE_URI)
            await server.register_namespace(DUMMY_NAMESPACE_URI)
        await self._build_address_space(server, idx)
        # Alarms: Sorter1 is an event notifier; a jam raises an event (Message, Severity).
        sorter = server.get_node(ua.NodeId("Sorter1", idx))
        await sorter.set_event_notifier([ua.EventNotifier.SubscribeToEvents])
        self._evgen = await server.get_event_generator(ua.ObjectIds.BaseEventType, sorter)
        # The consistent form: one custom event per induct, divert and scanner read.
        base = server.get_node(ua.ObjectIds.BaseEventType)
        self._evgens = {}
        for type_name, props in EVENT_TYPES.items():
            etype = await base.add_object_type(ua.NodeId(type_name, idx),
                                               ua.QualifiedName(type_name, idx))
            for prop, vtype in props:
                await etype.add_property(ua.NodeId(f"{type_name}.{prop}", idx),
                                         ua.QualifiedName(prop, idx),
                                         ua.get_default_value(vtype), varianttype=vtype)
            notifier = server.get_node(ua.NodeId(EVENT_NOTIFIERS[type_name], idx))
            gen = await server.get_event_generator(etype, notifier)
            gen.event.Message = ua.LocalizedText(type_name.removesuffix("EventType"))
            gen.event.Severity = 100
            self._evgens[type_name] = gen
        # The listening socket of the previous server may linger for a moment.
        for attempt in range(50):
            try:
                await server.start()
                break
            except OSError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        self._server, self._ns_idx = server, idx
        log.info("sorter serving endpoint=%s ns=%d security=%s", self.endpoint, idx, self.security)

    async def _build_address_space(self, server: Server, idx: int) -> None:
        parents: dict[str, Any] = {}
        objects = server.nodes.objects
        for name, (vtype, _) in VARIABLES.items():
            obj_name, folder_name, var_name = name.split(".")
            if obj_name not in parents:
                parents[obj_name] = await objects.add_object(
                    ua.NodeId(obj_name, idx), ua.QualifiedName(obj_name, idx))
            folder_id = f"{obj_name}.{folder_name}"
            if folder_id not in parents:
                parents[folder_id] = await parents[obj_name].add_object(
                    ua.NodeId(folder_id, idx), ua.QualifiedName(folder_name, idx))
            await parents[folder_id].add_variable(
                ua.NodeId(name, idx), ua.QualifiedName(var_name, idx),
                ua.Variant(self._values[name], vtype),
                datatype=ua.NodeId(vtype.value),
            )

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
            log.info("sorter server stopped endpoint=%s", self.endpoint)

    async def _publish(self, changes: dict[str, Any],
                       event: tuple[str, dict[str, Any]] | None = None) -> None:
        """Record values and write them to the server (if up) in the given order, stamped
        by the device clock; then raise `event` (type name, properties) if given. Sampled
        mode: the values wait for the sampler instead. While a restart has the server down,
        the line holds: this waits until it serves again."""
        while True:
            async with self._lock:
                if not self._down:
                    await self._publish_now(changes, event)
                    return
            await asyncio.sleep(TICK_SECS)

    async def _publish_now(self, changes: dict[str, Any],
                           event: tuple[str, dict[str, Any]] | None) -> None:
        self._values.update(changes)
        if self._server is None:
            return
        now = self.device_time()
        if self.sampling_ms > 0:
            for name, value in changes.items():
                self._staged[name] = (value, now, False)
        else:
            for name, value in changes.items():
                await self._write(name, value, now)
        if event is not None and self.events:
            gen = self._evgens[event[0]]
            for prop, value in event[1].items():
                setattr(gen.event, prop, value)
            await gen.trigger(time_attr=now)

    async def _write(self, name: str, value: Any, source_time: dt.datetime) -> None:
        assert self._server is not None
        vtype = VARIABLES[name][0]
        dv = ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=source_time,
                          ServerTimestamp=self.device_time())
        await self._server.write_attribute_value(ua.NodeId(name, self._ns_idx), dv)

    async def _sample(self) -> None:
        """Sampled mode: each variable is sampled on its own clock (a seeded phase) every
        `sampling_ms`; only its latest value is reported, with the time it changed."""
        loop = asyncio.get_running_loop()
        period = self.sampling_ms / 1000
        rng = random.Random(f"{self.seed}:sampler")
        start = loop.time()
        next_at = {name: start + rng.random() * period for name in VARIABLES}
        while True:
            await asyncio.sleep(max(min(next_at.values()) - loop.time(), 0.001))
            now = loop.time()
            async with self._lock:
                for name, t in next_at.items():
                    if t > now:
                        continue
                    next_at[name] = t + period if t + period > now else now + period
                    staged = self._staged.get(name)
                    if staged is None or staged[2] or self._server is None:
                        continue
                    self._staged[name] = (staged[0], staged[1], True)
                    await self._write(name, staged[0], staged[1])

    def _write_ground_truth(self) -> None:
        if self.ground_truth_path is not None:
            self.write_ground_truth(self.ground_truth_path)

    # --- the line ------------------------------------------------------------------

    def _induct_interval(self) -> float:
        return 1.0 / self.rate if self.rate > 0 else float("inf")

    def _plan_carton(self, index: int) -> Carton:
        # One Random per carton, drawn in a fixed order: the plan is a function of the seed.
        rng = random.Random(f"{self.seed}:{index}")
        barcode = f"{rng.randrange(10**17, 10**18)}"
        r = rng.random()
        recircs = rng.choice((1, 1, 2))
        m = self.mix
        edges = [
            (m.no_read, (Disposition.NO_READ,)),
            (m.no_destination, (Disposition.NO_DESTINATION,)),
            (m.lane_full, (Disposition.LANE_FULL,)),
            (m.recirculated, (Disposition.RECIRCULATED,) * recircs + (Disposition.SORTED,)),
            (m.lost_mistrack, (Disposition.LOST_MISTRACK,)),
        ]
        plan: tuple[Disposition, ...] = (Disposition.SORTED,)
        acc = 0.0
        for share, candidate in edges:
            acc += share
            if r < acc:
                plan = candidate
                break
        final = plan[-1]
        destination = None if final in (Disposition.NO_READ, Disposition.NO_DESTINATION) \
            else self.lane_for(barcode)
        return Carton(
            index=index, tracking_id=f"{self.tracking_prefix}{index + 1:07d}", barcode=barcode,
            read=final is not Disposition.NO_READ, destination=destination, plan=plan,
            scripted=False, inducted_at=_now_iso(),
        )

    async def _induct(self, carton: Carton) -> None:
        self._cartons.append(carton)
        self._by_tracking[carton.tracking_id] = carton
        self._schedule(carton, self.travel_secs)
        seen = carton.barcode if carton.read else ""
        scan_count = self._values["Scanner1.LastRead.Count"] + 1
        count = self._values["Sorter1.Induct.Count"] + 1
        self._induct_log.append({"count": count, "tracking_id": carton.tracking_id,
                                 "barcode": seen, "read": carton.read})
        await self._publish({
            "Scanner1.LastRead.Barcode": seen,
            "Scanner1.LastRead.TrackingId": carton.tracking_id,
            "Scanner1.LastRead.NoRead": not carton.read,
            "Scanner1.LastRead.Count": scan_count,
        }, ("ScannerReadEventType", {"Barcode": seen, "TrackingId": carton.tracking_id,
                                     "NoRead": not carton.read, "Count": scan_count}))
        await self._publish({
            "Sorter1.Induct.TrackingId": carton.tracking_id,
            "Sorter1.Induct.Barcode": seen,
            "Sorter1.Induct.Count": count,
        }, ("InductedEventType", {"TrackingId": carton.tracking_id, "Barcode": seen,
                                  "Count": count}))
        if self.jam_every and len(self._cartons) % self.jam_every == 0:
            await self._jam()

    def _schedule(self, carton: Carton, after_secs: float) -> None:
        self._due_seq += 1
        heapq.heappush(self._due, (self._belt_t + after_secs, self._due_seq, carton.index))

    async def _confirm(self, carton: Carton) -> None:
        disposition = carton.plan[len(carton.dispositions)]
        if disposition is Disposition.SORTED:
            assert carton.destination is not None
            lane = carton.destination
        elif disposition in (Disposition.RECIRCULATED, Disposition.LOST_MISTRACK):
            lane = NO_LANE
        else:
            lane = REJECT_LANE
        count = self._values["Sorter1.Divert.Count"] + 1
        await self._publish({
            "Sorter1.Divert.TrackingId": carton.tracking_id,
            "Sorter1.Divert.Lane": lane,
            "Sorter1.Divert.Disposition": int(disposition),
            "Sorter1.Divert.Count": count,
        }, ("DivertConfirmedEventType", {"TrackingId": carton.tracking_id, "Lane": lane,
                                         "Disposition": int(disposition), "Count": count}))
        # Done (in the ground truth) only once the server has said so.
        self._divert_log.append({"count": count, "tracking_id": carton.tracking_id,
                                 "lane": lane, "disposition": disposition.label})
        carton.dispositions.append(disposition)
        carton.lanes.append(lane)
        if not carton.done:
            self._schedule(carton, self.recirc_secs)

    async def alarm(self, message: str, severity: int = 800) -> None:
        """Raise an OPC UA event on Sorter1 (as the PLC does on a jam)."""
        if self._server is not None and getattr(self, "_evgen", None) is not None:
            self._evgen.event.Message = ua.LocalizedText(message)
            self._evgen.event.Severity = severity
            await self._evgen.trigger(time_attr=self.device_time())

    async def _jam(self) -> None:
        self._jammed_until = asyncio.get_running_loop().time() + self.jam_secs
        log.info("sorter jammed for %.1f s", self.jam_secs)
        await self.alarm(f"sorter jammed (fault {JAM_FAULT_CODE})", 800)
        await self._publish({
            "Sorter1.State.Running": False,
            "Sorter1.State.FaultCode": JAM_FAULT_CODE,
            "Sorter1.State.Jammed": True,
        })

    async def _clear_jam(self) -> None:
        self._jammed_until = None
        await self._publish({
            "Sorter1.State.Jammed": False,
            "Sorter1.State.FaultCode": 0,
            "Sorter1.State.Running": True,
        })

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        self._next_induct_t = self._belt_t + self._induct_interval()
        while True:
            await asyncio.sleep(TICK_SECS)
            now = loop.time()
            elapsed, last = now - last, now
            if self._down:
                continue
            if self._jammed_until is not None:
                if now < self._jammed_until:
                    continue
                await self._clear_jam()
            self._belt_t += elapsed
            while self._due and self._due[0][0] <= self._belt_t and not self._down:
                _, _, index = heapq.heappop(self._due)
                await self._confirm(self._cartons[index])
            if self._paused or self.rate <= 0:
                continue
            # Catch up at most a few cartons per tick after a stall, then resync.
            for _ in range(10):
                if self._next_induct_t > self._belt_t or self._jammed_until is not None \
                        or self._down:
                    break
                await self._induct(self._plan_carton(len(self._cartons)))
                self._next_induct_t += self._induct_interval()
            else:
                self._next_induct_t = self._belt_t + self._induct_interval()


# --- CLI ------------------------------------------------------------------------------

def add_realism_args(p: argparse.ArgumentParser) -> None:
    """The realism switches (module docstring), shared with ``simulators.sorter_operator``."""
    p.add_argument("--timestamp-resolution-ms", type=float, default=1.0,
                   help="SourceTimestamp resolution; 0: full")
    p.add_argument("--clock-offset-secs", type=float, default=2.0, help="device clock offset")
    p.add_argument("--clock-drift-ppm", type=float, default=50.0, help="device clock drift")
    p.add_argument("--sampling-ms", type=float, default=0.0,
                   help="sample each variable at this interval; 0: exception-based")
    p.add_argument("--no-events", action="store_true",
                   help="no induct/divert/scan OPC UA events (variables only)")
    p.add_argument("--warmup-cartons", type=int, default=0,
                   help="cartons inducted at start, before serving")


def realism_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"timestamp_resolution_ms": args.timestamp_resolution_ms,
            "clock_offset_secs": args.clock_offset_secs, "clock_drift_ppm": args.clock_drift_ppm,
            "sampling_ms": args.sampling_ms, "events": not args.no_events,
            "warmup_cartons": args.warmup_cartons}


def _parse_users(values: Sequence[str]) -> dict[str, str]:
    users = {}
    for v in values:
        name, sep, password = v.partition(":")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--user must be NAME:PASSWORD, got {v!r}")
        users[name] = password
    return users


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = SorterSim(
        host=args.host, port=args.port, rate=args.rate, seed=args.seed, lanes=args.lanes,
        travel_secs=args.travel_secs, jam_every=args.jam_every, jam_secs=args.jam_secs,
        security=args.security, users=_parse_users(args.user), cert_dir=args.cert_dir,
        ground_truth_path=args.ground_truth, **realism_kwargs(args),
    )
    async with sim:
        ready = f"READY sorter endpoint={sim.endpoint} ns={sim.namespace_index}"
        if sim.security == "sign_encrypt":
            ready += f" cert={sim.server_certificate_path}"
        print(ready, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.opcua_sorter",
                                description="OPC UA carton sorter simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4840, help="0 picks a free port")
    p.add_argument("--rate", type=float, default=2.0, help="cartons per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lanes", type=int, default=24)
    p.add_argument("--travel-secs", type=float, default=1.0, help="induct to divert")
    p.add_argument("--jam-every", type=int, default=0, help="jam after every N cartons; 0 never")
    p.add_argument("--jam-secs", type=float, default=1.0)
    p.add_argument("--security", choices=("none", "sign_encrypt"), default="none")
    p.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                   help="require this user (repeatable); no --user allows anonymous")
    p.add_argument("--cert-dir", type=Path, help="server certificate and key, made if missing")
    p.add_argument("--ground-truth", type=Path, help="write every carton here as JSON on exit")
    p.add_argument("--log-level", default="WARNING")
    add_realism_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        _parse_users(args.user)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    asyncio.run(_serve_until_signalled(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
