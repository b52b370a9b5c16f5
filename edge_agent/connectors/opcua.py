"""OPC UA connector: subscribes to a server's nodes per the device profile, self-healing.

One connector per device (server). At every connect it resolves each signal's node by
namespace URI or browse path (namespace indexes may change between connects), checks that
every node exists (a missing one is a clear error naming it), creates one subscription and
its monitored items in batches, and reads ``mode: poll`` signals at their interval. Health
turns "online" only once the subscription and all its monitored items exist: from then on
every change is reported, so "online since" is when the device became covered; the current
values a server sends first only set the baseline and never make events.

Self-healing: asyncua's own watchdog probes the session; on a loss (server restart, network
drop, failed secure channel renewal) the connector raises ``NotConnected`` and the
supervisor reconnects with backoff, resolving nodes and recreating the subscription anew.
The triggers' state lives on the connector across reconnects, so the current values a
server re-sends after a reconnect never make duplicate events (a counter that moved on
while we were away makes one event for its current value, with the steps missed reported
as a counter gap).

**Binding fields to a trigger (``fields_from: notifications``, the default).** Each publish
response is handled whole, in the order the server put it (a subclass of asyncua's
Subscription takes the response itself: no task per notification). Only the order *within
one monitored item's queue* is meaningful (servers group notifications per item; asyncua's
server does), and SourceTimestamps are no order at all (a PLC stamps milliseconds, so
several writes share one): binding by sorting timestamps gave other cartons' fields. So for
each event, the trigger item's notifications in a response are its steps, in order; each
field item's notifications since the previous step (carried across responses when a
response has none of the trigger's) are matched to them:

- as many field notifications as trigger notifications: pairwise, in queue order;
- none: the field did not change, every step has its current value;
- any other count, a queue overflow (the Overflow bit), or no value known yet: the binding
  is ambiguous, and the connector does not guess: each step that fires is reported as
  ``bad_payload(..., "inconsistent_snapshot", ...)`` instead of an event with wrong fields.

Field items are monitored with DataChangeTrigger StatusValueTimestamp, so a field written
again with the same value for the next step still counts (unless it shares the previous
write's millisecond too: then the counts differ and it is reported). This is exact for an
exception-based server that writes each field once per step before the trigger; a
*sampling* server (it skips intermediate values, samples items on their own clocks) or a
device that writes a field twice per step cannot be bound from data changes: such steps
are reported as inconsistent, and the profile should take a consistent form:

- ``opcua_event``: an OPC UA event that carries all the fields (a custom event type such as
  DivertConfirmedEventType with TrackingId/Lane/Disposition/Count properties); one
  notification, consistent by construction; ``sequence`` names a counter property for
  identity and gap reports. The preferred form where the server has one.
- ``fields_from: read``: when the trigger fires, one Read of the trigger and field nodes;
  the fields are taken only if the trigger still has the value (and SourceTimestamp) that
  fired, else ``inconsistent_snapshot`` (the trigger moved on). Consistent for servers that
  update a record atomically with respect to a Read (a PLC scan); a device that writes the
  next record's fields before its trigger can still race it.

**Time and identity.** A data-change event's time is the trigger's SourceTimestamp (else
its ServerTimestamp, else arrival); an OPC UA event's time is its ``Time`` property (else
ReceiveTime, else arrival). Device times are passed on as the device said them (never
clamped here: the rules engine handles clocks that are far off, per device);
``received_at`` is the agent's clock. A message id comes from what the device said: a
counter's value; an OPC UA event's ``sequence`` property, else its EventId; for other
triggers the trigger's SourceTimestamp, value and field values, so the same notification
seen again (after a reconnect, or by a restarted agent) has the same id.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
import traceback
from collections import deque
from typing import Any

from asyncua import Client, Node, ua
from asyncua.common.events import Event, get_filter_from_event_type
from asyncua.common.subscription import Subscription
from asyncua.crypto import security_policies
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..config import OpcuaConnection
from ..errors import NotConnected, RetriableError
from ..events import DeviceEvent
from ..profiles_opcua import NODE_RE, OpcuaEvent, OpcuaProfile
from ..rules.engine import Ingest
from ..runtime.clock import Clock
from ..runtime.supervisor import Health
from .triggers import Watch

log = logging.getLogger(__name__)


POLICIES = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
OVERFLOW = 0x0480  # StatusCode InfoType DataValue + Overflow: the item's queue lost values
CERT_FILE = "edge-agent-cert.der"  # the agent's application certificate, in certificate_dir
# Status codes of a server refusing our application certificate (channel or session).
CERTIFICATE_REFUSALS = frozenset({
    "BadSecurityChecksFailed", "BadCertificateUntrusted", "BadCertificateInvalid",
    "BadCertificateTimeInvalid", "BadCertificateIssuerTimeInvalid", "BadCertificateUriInvalid",
    "BadCertificateUseNotAllowed", "BadCertificateIssuerUseNotAllowed", "BadCertificateRevoked",
    "BadCertificateIssuerRevoked", "BadCertificateRevocationUnknown",
    "BadCertificateIssuerRevocationUnknown", "BadCertificatePolicyCheckFailed",
    "BadNoValidCertificates",
})
MAX_PENDING = 10_000  # field notifications kept per event while its trigger is quiet
MAX_READS = 10_000
MAX_HELD = 100  # publish responses held after pause_reading, before the server stops  # fired triggers waiting for their Read (fields_from: read)
UNKNOWN = object()  # a field with no value since the subscription was made


def _item(node_id: Any, attribute: Any, params: ua.MonitoringParameters
          ) -> ua.MonitoredItemCreateRequest:
    """A reporting monitored item on ``attribute`` of ``node_id``."""
    rv = ua.ReadValueId()
    rv.NodeId = node_id
    rv.AttributeId = attribute
    req = ua.MonitoredItemCreateRequest()
    req.ItemToMonitor = rv
    req.MonitoringMode = ua.MonitoringMode.Reporting
    req.RequestedParameters = params
    return req


def _der(data: bytes) -> bytes:
    """A certificate file's DER bytes (files may be DER or PEM)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    return data


def _overflowed(dv: ua.DataValue) -> bool:
    sc = dv.StatusCode
    return sc is not None and (getattr(sc, "value", 0) & OVERFLOW) == OVERFLOW


def _stamp(dv: ua.DataValue | None) -> Any:
    """The device's time of a value: SourceTimestamp, else ServerTimestamp (datetime)."""
    if dv is None:
        return None
    return dv.SourceTimestamp or dv.ServerTimestamp


def _fill(current: Any, pending: list[Any], k: int) -> list[Any]:
    """The field's value at each of k steps, from fewer notifications (m < k): a server
    does not report a write of the value (and timestamp) the field already had, so the k - m
    unreported steps each repeat the value before them, at unknown places. Step i (1-based)
    then had one of ``([current] + pending)[max(0, i - d) : min(i, m) + 1]`` (d = k - m):
    known where those are all one value, else UNKNOWN. With no notification at all, every
    step had the current value."""
    seq = [current, *pending]
    m, d = len(pending), k - len(pending)
    out = []
    for i in range(1, k + 1):
        cands = seq[max(0, i - d) : min(i, m) + 1]
        first = cands[0]
        out.append(first if first is not UNKNOWN and all(x == first for x in cands) else UNKNOWN)
    return out


class _Watcher:
    """An event from a trigger on a signal, with its fields' binding state."""

    def __init__(self, name: str, spec: OpcuaEvent):
        t = spec.trigger
        assert t is not None
        self.name = name
        self.signal = t.signal
        self.kind = t.kind
        self.watch = Watch(t.kind, modulus=t.modulus, deadband=t.deadband)
        self.fields = dict(spec.fields)  # event field -> signal
        self.read = spec.fields_from == "read"
        self.inconsistent = 0
        self.reset()

    def reset(self) -> None:
        """A new subscription: nothing is known of the fields until its first values."""
        self.pending: dict[str, list[Any]] = {f: [] for f in self.fields}
        self.current: dict[str, Any] = dict.fromkeys(self.fields, UNKNOWN)
        self.lost: set[str] = set()


class _EventSource:
    """An event (or alarm) taken from OPC UA events of one notifier and type."""

    def __init__(self, name: str, fields: dict[str, str], *, notifier: str, type_: str | None,
                 sequence: str | None = None, modulus: int = 2**32, queue_size: int = 10_000,
                 enums: dict[str, dict[int, str]] | None = None):
        self.name = name
        self.fields = fields  # event field -> property
        self.notifier = notifier
        self.type = type_
        self.sequence = sequence
        self.modulus = modulus
        self.queue_size = queue_size
        self.enums = enums or {}
        self.last_seq: int | None = None
        self.missed_total = 0
        self.index: dict[str, int] = {}  # property -> position in the select clauses


class _Ordered(Subscription):
    """asyncua's Subscription, but a publish response goes to the connector whole and in
    the server's order, in the publish loop (asyncua would make a task per notification)."""

    def __init__(self, session: Any, params: ua.CreateSubscriptionParameters,
                 owner: OpcuaConnector):
        super().__init__(session, params, owner)
        self._owner = owner

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        self._owner.publish_responses += 1
        msg = publish_result.NotificationMessage
        if not msg.NotificationData:
            return
        self.last_sequence_number = int(msg.SequenceNumber)
        try:
            self._owner._publish_or_hold(msg.NotificationData)
        except Exception:  # a bug here must not kill the publish loop unseen
            log.exception("%s: failed to handle a publish response", self._owner.name)


class OpcuaConnector:
    def __init__(self, device: str, conn: OpcuaConnection, profile: OpcuaProfile, clock: Clock):
        self.name = f"opcua:{device}"
        self.device = device
        self.conn = conn
        self.profile = profile
        self.clock = clock
        self.watchers = [_Watcher(n, e) for n, e in profile.events.items() if e.trigger is not None]
        self.sources = [
            _EventSource(n, dict(e.fields), notifier=e.opcua_event.notifier, type_=e.opcua_event.type,
                         sequence=e.opcua_event.sequence, modulus=e.opcua_event.modulus,
                         queue_size=e.opcua_event.queue_size, enums=e.enums)
            for n, e in profile.events.items() if e.opcua_event is not None
        ] + [
            # Alarms: every event of the notifier (BaseEventType), identified by EventId.
            _EventSource(n, dict(a.fields), notifier=a.source, type_=None)
            for n, a in profile.alarms.items()
        ]
        self.values: dict[str, Any] = {}
        self.health = Health()
        self.notifications = 0
        self.client: Client | None = None
        self.ingest: Ingest | None = None
        self._by_handle: dict[int, str] = {}
        self._source_by_handle: dict[int, _EventSource] = {}
        self._reads: deque[tuple[_Watcher, Any, ua.DataValue, float]] = deque()
        self._read_wake = asyncio.Event()
        self._lost: asyncio.Future[None] | None = None
        self._stopping = False
        self._warned_blind_trust = False
        self._source_nodes: dict[str, Node] = {}
        self.publish_responses = 0  # publish responses received (keep-alives included)
        self._paused = False  # kept across reconnects
        self._held: deque[list[Any]] = deque()  # responses that arrived after pause_reading
        self._sub: Subscription | None = None
        self._mode_lock = asyncio.Lock()
        self._warned_held = False

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, ingest: Ingest) -> None:
        self.ingest = ingest
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        c = self.conn
        client = Client(c.endpoint, timeout=c.timeout_secs, watchdog_intervall=c.keepalive_secs,
                        auto_reconnect=False)
        client.connection_lost_callback = self._on_lost
        client.max_messagesize = c.max_message_bytes  # capped: a huge response cannot sink us
        if c.username:
            client.set_user(c.username)
            if c.password_file:
                client.set_password(c.password_file.read_text(encoding="utf-8").strip())
        self.client = client
        tasks: list[asyncio.Task[None]] = []
        try:
            if c.user_certificate is not None and c.user_private_key is not None:
                # asyncua names these "client" but they are the X509 *user* identity token.
                await client.load_client_certificate(str(c.user_certificate))
                await client.load_private_key(str(c.user_private_key))
            if c.security_policy != "None":
                await self._secure(client)
            try:
                await asyncio.wait_for(client.connect(), c.timeout_secs * 2)
            except Exception as exc:  # asyncua may fail a refused channel with a bare assert
                raise self._connect_error(exc) from exc
            nodes = await self._resolve(client)
            self._reads.clear()
            sub = await self._subscribe(client, nodes)
            self._sub = sub
            # Covered from here on: every change after this is reported to us.
            self.health.set("online")
            log.info("%s online: %d signals, subscription %s", self.name, len(nodes), sub.subscription_id)
            polled = {n: nodes[n] for n, s in self.profile.signals.items() if s.mode == "poll"}
            if polled:
                tasks.append(asyncio.create_task(self._poll(polled)))
            if any(w.read for w in self.watchers):
                tasks.append(asyncio.create_task(self._reader(client, nodes)))
            await self._lost
        finally:
            for t in tasks:
                t.cancel()
            self.client = None
            self._sub = None
            try:
                await asyncio.wait_for(client.disconnect(), 2)
            except Exception:
                pass

    async def _secure(self, client: Client) -> None:
        """Application certificate (made on first start), then the server's certificate checked
        against the trusted one or the pinned fingerprint before any session is opened."""
        c = self.conn
        pki = c.certificate_dir
        pki.mkdir(parents=True, exist_ok=True)
        key, cert = pki / "edge-agent-key.pem", pki / CERT_FILE
        host = socket.gethostname()
        client.application_uri = f"urn:edge-agent:{host}"
        if not cert.exists() or not key.exists():
            await setup_self_signed_certificate(
                key, cert, client.application_uri, host, [ExtendedKeyUsageOID.CLIENT_AUTH],
                {"commonName": f"edge-agent@{host}", "organizationName": "edge-agent"},
            )
            log.info("%s: created the agent's application certificate %s", self.name, cert)
        policy = POLICIES[c.security_policy]
        mode = getattr(ua.MessageSecurityMode, c.security_mode)
        try:
            endpoints = await asyncio.wait_for(client.connect_and_get_server_endpoints(),
                                               c.timeout_secs * 2)
        except (OSError, TimeoutError, ua.UaError) as exc:
            raise NotConnected(f"{self.name}: cannot reach {c.endpoint}: {exc!r}") from exc
        ep = next((e for e in endpoints if e.SecurityPolicyUri == policy.URI
                   and e.SecurityMode == mode), None)
        if ep is None:
            offered = sorted({f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}"
                              for e in endpoints})
            raise NotConnected(f"{self.name}: server offers no {c.security_policy}/"
                               f"{c.security_mode} endpoint (it offers: {', '.join(offered)})")
        der = bytes(ep.ServerCertificate)
        fingerprint = hashlib.sha256(der).hexdigest()
        if c.server_fingerprint:
            pinned = c.server_fingerprint.replace(":", "").lower()
            if fingerprint != pinned:
                raise NotConnected(f"{self.name}: refused the server certificate: SHA-256 "
                                   f"fingerprint {fingerprint} is not the pinned {pinned}")
        elif c.server_certificate:
            trusted = _der(c.server_certificate.read_bytes())
            if der != trusted:
                raise NotConnected(f"{self.name}: refused the server certificate (SHA-256 "
                                   f"{fingerprint}): it is not the trusted {c.server_certificate}")
        elif not self._warned_blind_trust:
            self._warned_blind_trust = True
            log.warning("%s: accepting the server certificate %s without checking it "
                        "(trust_any_server_certificate)", self.name, fingerprint)
        await client.set_security(policy, str(cert), str(key), server_certificate=der, mode=mode)

    def _connect_error(self, exc: Exception) -> NotConnected:
        """What a failed connect means, in words an operator can act on. With security on,
        a server that does not trust our application certificate refuses it with a status
        (BadSecurityChecksFailed at the channel, BadCertificateUntrusted at the session) or
        just closes the connection while the secure channel opens (asyncua then fails with
        a ConnectionError, or a bare AssertionError when the refusal comes as a channel
        response): every one of these names our certificate file and what to do."""
        c = self.conn
        where = f"{self.name}: cannot connect to {c.endpoint}"
        if c.security_policy == "None":
            return NotConnected(f"{where}: {exc!r}")
        cert = c.certificate_dir / CERT_FILE
        code = exc.code if isinstance(exc, ua.UaStatusCodeError) else None
        if code is not None:
            name, doc = ua.status_codes.get_name_and_doc(code)
            if name in CERTIFICATE_REFUSALS:
                return NotConnected(
                    f"{where}: the server refused our application certificate {cert} ({name}: "
                    f"{doc}); the server must trust it: add {cert} to the server's trusted "
                    f"certificates (or accept it in its rejected list)")
            return NotConnected(f"{where}: {exc!r}")
        opening = any(f.f_code.co_name == "open_secure_channel"
                      for f, _ in traceback.walk_tb(exc.__traceback__))
        if opening and not isinstance(exc, TimeoutError):
            return NotConnected(
                f"{where}: the server closed the secure channel ({c.security_policy}/"
                f"{c.security_mode}) while it was being opened with our application "
                f"certificate {cert} ({exc!r}); servers do this when they do not trust the "
                f"client's certificate: the server must trust it (add {cert} to the server's "
                f"trusted certificates)")
        return NotConnected(f"{where}: {exc!r}")

    async def stop(self) -> None:
        self._stopping = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # --- backpressure (see connectors/base.py) -------------------------------------------

    def pause_reading(self) -> None:
        """Disable publishing on the subscription: the server keeps sampling and queues the
        notifications in each monitored item's queue (``queue_size``, server-side and
        bounded: a pause longer than a queue holds overflows it, and the loss shows as a
        counter gap or an overflow). A response already on its way is held, unread."""
        if self._paused:
            return
        self._paused = True
        log.info("%s: reading paused (publishing disabled on the subscription)", self.name)
        self._sync_publishing()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        log.info("%s: reading resumed", self.name)
        while self._held:  # what arrived before the server stopped publishing, in order
            self._publish(self._held.popleft())
        self._sync_publishing()

    def _publish_or_hold(self, data: list[Any]) -> None:
        if not self._paused:
            self._publish(data)
            return
        if len(self._held) < MAX_HELD:
            self._held.append(data)
            return
        # The server goes on publishing (it ignored or has not yet applied the mode): no
        # unbounded buffer here; ingest rather than drop.
        if not self._warned_held:
            self._warned_held = True
            log.warning("%s: the server keeps publishing while paused; ingesting anyway", self.name)
        self._publish(data)

    def _sync_publishing(self) -> None:
        sub = self._sub
        if sub is None:
            return  # not subscribed: the next subscription is made in the right mode
        task = asyncio.ensure_future(self._set_publishing(sub))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _set_publishing(self, sub: Subscription) -> None:
        async with self._mode_lock:  # the last call wins: apply the mode wanted now
            try:
                await asyncio.wait_for(sub.set_publishing_mode(not self._paused),
                                       self.conn.timeout_secs)
            except (ua.UaError, OSError, TimeoutError) as exc:
                # A lost connection makes a new subscription in the right mode.
                log.warning("%s: could not set publishing %s: %r", self.name,
                            "off" if self._paused else "on", exc)

    async def _on_lost(self, exc: Exception) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_exception(NotConnected(f"{self.name}: connection lost: {exc!r}"))

    # --- nodes -----------------------------------------------------------------------------

    async def _resolve(self, client: Client) -> dict[str, Node]:
        """Every signal's node, resolved now by namespace URI; missing nodes are named."""
        indexes: dict[str, int] = {}

        async def index(uri: str) -> int:
            if uri not in indexes:
                try:
                    indexes[uri] = await client.get_namespace_index(uri)
                except ValueError:
                    raise RetriableError(f"{self.name}: server has no namespace {uri!r}") from None
            return indexes[uri]

        async def locate(what: str, address: str) -> Node:
            m = NODE_RE.match(address)
            if m is not None:
                uri, kind, ident = m.groups()
                return client.get_node(f"ns={await index(uri)};{kind}={ident}")
            parts = []
            for el in address.split("/"):
                alias, _, bname = el.partition(":")
                ns = int(alias) if alias.isdigit() else await index(self.profile.namespaces[alias])
                parts.append(f"{ns}:{bname}")
            try:
                return await client.nodes.objects.get_child(parts)
            except ua.UaStatusCodeError as exc:
                raise RetriableError(f"{self.name}: {what}: no node at path Objects/{address} "
                                     f"({exc})") from exc

        nodes: dict[str, Node] = {}
        for name, s in self.profile.signals.items():
            nodes[name] = await locate(f"signal '{name}'", s.node or s.path or "")
        self._source_nodes = {}
        for src in self.sources:
            self._source_nodes[src.name] = await locate(f"event '{src.name}' notifier", src.notifier)
            if src.type is not None:
                self._source_nodes[f"{src.name}/type"] = await locate(f"event '{src.name}' type",
                                                                      src.type)
        # One batched read proves every node exists.
        named = {**{f"signal '{n}' ({s.node or s.path})": nodes[n]
                    for n, s in self.profile.signals.items()},
                 **{f"event node {k}": v for k, v in self._source_nodes.items()}}
        results = await client.read_attributes(list(named.values()), ua.AttributeIds.NodeClass)
        missing = [n for n, r in zip(named, results, strict=True) if not r.StatusCode.is_good()]
        if missing:
            raise RetriableError(f"{self.name}: nodes not found on the server: {', '.join(missing)}")
        return nodes

    async def _subscribe(self, client: Client, nodes: dict[str, Node]) -> Subscription:
        p = self.profile
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = p.publishing_interval_ms
        params.RequestedLifetimeCount = 10000
        params.RequestedMaxKeepAliveCount = client.get_keepalive_count(p.publishing_interval_ms)
        params.MaxNotificationsPerPublish = 0  # no limit: a response is never cut in two
        params.PublishingEnabled = not self._paused  # a pause holds across reconnects
        params.Priority = 0
        sub = _Ordered(client.uaclient.session, params, self)
        await sub.init()
        self._by_handle = {}
        self._source_by_handle = {}
        for w in self.watchers:
            w.reset()
        # Fields before triggers, so that first values are taken in one go where possible.
        triggers = {w.signal for w in self.watchers}
        names = [n for n, s in p.signals.items() if s.mode == "subscribe" and n not in triggers]
        names += [n for n, s in p.signals.items() if s.mode == "subscribe" and n in triggers]
        for i in range(0, len(names), p.items_per_call):
            batch = names[i : i + p.items_per_call]
            requests = [self._item_request(n, nodes[n]) for n in batch]
            results = await sub.create_monitored_items(requests)
            bad = [f"{n} ({r})" for n, r in zip(batch, results, strict=True)
                   if isinstance(r, ua.StatusCode)]
            if bad:
                raise RetriableError(f"{self.name}: server refused monitored items: {', '.join(bad)}")
        for src in self.sources:
            req = await self._event_request(client, src)
            results = await sub.create_monitored_items([req])
            if isinstance(results[0], ua.StatusCode):
                raise RetriableError(f"{self.name}: server refused events of '{src.name}' "
                                     f"({src.notifier}): {results[0]}")
        return sub

    def _handle(self) -> int:
        return len(self._by_handle) + len(self._source_by_handle) + 1  # our subscription: our handles

    def _item_request(self, name: str, node: Node) -> ua.MonitoredItemCreateRequest:
        s = self.profile.signals[name]
        params = ua.MonitoringParameters()
        params.ClientHandle = self._handle()
        params.SamplingInterval = s.sampling_interval_ms
        params.QueueSize = s.queue_size
        params.DiscardOldest = s.discard_oldest
        f = ua.DataChangeFilter()
        f.Trigger = (ua.DataChangeTrigger.StatusValueTimestamp if s.trigger_on_timestamp
                     else ua.DataChangeTrigger.StatusValue)
        if s.deadband is not None:
            f.DeadbandType = 1 if s.deadband.kind == "absolute" else 2
            f.DeadbandValue = s.deadband.value
        params.Filter = f
        self._by_handle[params.ClientHandle] = name
        return _item(node.nodeid, ua.AttributeIds.Value, params)

    async def _event_request(self, client: Client, src: _EventSource) -> ua.MonitoredItemCreateRequest:
        if src.type is None:  # every event: no where clause (some servers choke on long ones)
            evfilter = await get_filter_from_event_type(
                [client.get_node(ua.ObjectIds.BaseEventType)], where_clause_generation=False)
        else:
            evfilter = await get_filter_from_event_type([self._source_nodes[f"{src.name}/type"]])
        src.index = {Event.browse_path_to_attribute_name(c.BrowsePath): i
                     for i, c in enumerate(evfilter.SelectClauses) if c.BrowsePath}
        wanted = [*src.fields.values(), *([src.sequence] if src.sequence else [])]
        absent = [prop for prop in wanted if prop not in src.index]
        if absent:
            raise RetriableError(f"{self.name}: event '{src.name}': the event type {src.type} "
                                 f"has no propert{'y' if len(absent) == 1 else 'ies'} "
                                 f"{', '.join(absent)}")
        params = ua.MonitoringParameters()
        params.ClientHandle = self._handle()
        params.QueueSize = src.queue_size
        params.DiscardOldest = False
        params.Filter = evfilter
        self._source_by_handle[params.ClientHandle] = src
        return _item(self._source_nodes[src.name].nodeid, ua.AttributeIds.EventNotifier, params)

    async def _poll(self, nodes: dict[str, Node]) -> None:
        names, node_list = list(nodes), list(nodes.values())
        while True:
            await asyncio.sleep(self.profile.poll_interval_ms / 1000)
            client = self.client
            if client is None:
                return
            if self._paused:
                continue
            try:
                dvs = await client.read_attributes(node_list, ua.AttributeIds.Value)
            except (ua.UaError, OSError, TimeoutError) as exc:
                log.warning("%s: polled read failed: %s", self.name, exc)
                continue
            # One read: fields and triggers of the same instant, one notification each.
            self._apply({n: [dv] for n, dv in zip(names, dvs, strict=True)}, self.clock.now())

    # --- notifications (one publish response at a time, in the publish loop) ---------------

    def _publish(self, data: list[Any]) -> None:
        for nd in data:
            if isinstance(nd, ua.DataChangeNotification):
                per: dict[str, list[ua.DataValue]] = {}
                by_handle = self._by_handle
                for item in nd.MonitoredItems:
                    name = by_handle.get(item.ClientHandle)
                    if name is not None:
                        per.setdefault(name, []).append(item.Value)
                self.notifications += len(nd.MonitoredItems)
                self._apply(per, self.clock.now())
            elif isinstance(nd, ua.EventNotificationList):
                now = self.clock.now()
                for efl in nd.Events:
                    src = self._source_by_handle.get(efl.ClientHandle)
                    if src is not None:
                        self.notifications += 1
                        self._event(src, efl.EventFields, now)
            elif isinstance(nd, ua.StatusChangeNotification):
                self.status_change_notification(nd)

    def status_change_notification(self, status: Any) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_exception(NotConnected(f"{self.name}: subscription status {status}"))

    def _decode(self, name: str, dv: ua.DataValue) -> Any:
        val = dv.Value.Value if dv.Value is not None else None
        enum = self.profile.signals[name].enum
        return enum.get(val, f"unknown({val})") if enum and isinstance(val, int) else val

    def _apply(self, per: dict[str, list[ua.DataValue]], now: float) -> None:
        """One batch of notifications (a publish response, or one poll), per signal in queue
        order: bind each event's field notifications to its trigger's, then observe."""
        vals = {name: [self._decode(name, dv) for dv in dvs] for name, dvs in per.items()}
        for name, vs in vals.items():
            self.values[name] = vs[-1]
        for w in self.watchers:
            trig = per.get(w.signal)
            if trig:
                self._bind(w, trig, vals[w.signal], per, vals, now)
                continue
            for f, sig in w.fields.items():  # fields before their trigger: carried over
                got = vals.get(sig)
                if got:
                    pending = w.pending[f]
                    pending.extend(got)
                    if len(pending) > MAX_PENDING or any(_overflowed(dv) for dv in per[sig]):
                        del pending[:-MAX_PENDING]
                        w.lost.add(f)

    def _bind(self, w: _Watcher, trig: list[ua.DataValue], tvals: list[Any],
              per: dict[str, list[ua.DataValue]], vals: dict[str, list[Any]], now: float) -> None:
        ingest = self.ingest
        assert ingest is not None
        k = len(tvals)
        trig_lost = any(_overflowed(dv) for dv in trig) and w.kind != "counter"
        columns: dict[str, list[Any]] = {}
        why: dict[str, str] = {}
        for f, sig in w.fields.items():
            pending = w.pending[f]
            got = vals.get(sig)
            if got:
                pending.extend(got)
                if any(_overflowed(dv) for dv in per[sig]):
                    w.lost.add(f)
            if f in w.lost or trig_lost:
                columns[f] = [UNKNOWN] * k
                why[f] = f"{sig}: queue overflow"
            elif len(pending) == k:
                columns[f] = pending  # pairwise, in queue order
            elif len(pending) < k:
                columns[f] = _fill(w.current[f], pending, k)
                why[f] = (f"{sig}: no value yet" if w.current[f] is UNKNOWN and not pending
                          else f"{sig}: {len(pending)} notification(s) for {k} of {w.signal}")
            else:
                columns[f] = [UNKNOWN] * k
                why[f] = f"{sig}: {len(pending)} notification(s) for {k} of {w.signal}"
            if pending:
                w.current[f] = pending[-1]
                w.pending[f] = []
        w.lost.clear()
        for i, v in enumerate(tvals):
            last = w.watch.last
            fire, missed = w.watch.observe(v)
            if missed:
                ingest.bad_payload(self.device, f"{w.name}:{w.signal}", "counter_gap",
                                   f"{missed} event(s) missed: {last} -> {v}", b"", None)
            if not fire:
                continue
            if w.read:
                self._queue_read(w, v, trig[i], now)
                continue
            fields = {f: col[i] for f, col in columns.items()}
            unbound = [why[f] for f, x in fields.items() if x is UNKNOWN]
            if unbound:
                w.inconsistent += 1
                ingest.bad_payload(self.device, f"{w.name}:{w.signal}", "inconsistent_snapshot",
                                   f"{w.signal}={v!r}: fields not bound ({'; '.join(unbound)})",
                                   b"", None)
                continue
            self._emit(w, v, trig[i], fields, now)

    def _emit(self, w: _Watcher, v: Any, dv: ua.DataValue, fields: dict[str, Any], now: float) -> None:
        assert self.ingest is not None
        ts = _stamp(dv)
        t = ts.timestamp() if ts is not None else now
        if w.kind == "counter":
            ident = f"{v}"
        else:  # what the device said: the trigger's time and value, and the fields
            digest = hashlib.sha256(repr((v, sorted(fields.items()))).encode()).hexdigest()[:16]
            ident = f"{ts.isoformat() if ts is not None else '-'}#{digest}"
        self.ingest.device_event(
            DeviceEvent(self.device, w.name, fields, t, now, f"{self.device}/{w.name}/{ident}"), None
        )

    # --- fields_from: read ---------------------------------------------------------------

    def _queue_read(self, w: _Watcher, v: Any, dv: ua.DataValue, now: float) -> None:
        if len(self._reads) >= MAX_READS:
            assert self.ingest is not None
            w.inconsistent += 1
            self.ingest.bad_payload(self.device, f"{w.name}:{w.signal}", "inconsistent_snapshot",
                                    f"{w.signal}={v!r}: too many reads pending", b"", None)
            return
        self._reads.append((w, v, dv, now))
        self._read_wake.set()

    async def _reader(self, client: Client, nodes: dict[str, Node]) -> None:
        """Reads the fields of fired triggers: one Read per event and wake-up, whatever
        the number of steps waiting (only the latest can still be consistent)."""
        while True:
            await self._read_wake.wait()
            self._read_wake.clear()
            while self._reads:
                waiting = list(self._reads)
                self._reads.clear()
                groups: dict[str, list[tuple[_Watcher, Any, ua.DataValue, float]]] = {}
                for item in waiting:
                    groups.setdefault(item[0].name, []).append(item)
                for items in groups.values():
                    await self._read_fields(client, nodes, items)

    async def _read_fields(self, client: Client, nodes: dict[str, Node],
                           items: list[tuple[_Watcher, Any, ua.DataValue, float]]) -> None:
        ingest = self.ingest
        assert ingest is not None
        w = items[0][0]
        sigs = list(w.fields.values())
        try:
            dvs = await client.read_attributes([nodes[w.signal], *(nodes[s] for s in sigs)],
                                               ua.AttributeIds.Value)
            problem = ""
        except (ua.UaError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
            dvs, problem = [], f"read failed: {exc!r}"
        if dvs:
            now_v, now_ts = self._decode(w.signal, dvs[0]), _stamp(dvs[0])
            fields = {f: self._decode(sig, dv) for (f, sig), dv in zip(w.fields.items(), dvs[1:],
                                                                        strict=True)}
        for _, v, dv, t in items:
            if dvs and v == now_v and (now_ts is None or _stamp(dv) in (None, now_ts)):
                self._emit(w, v, dv, fields, t)
                continue
            w.inconsistent += 1
            detail = problem or f"the trigger moved on to {now_v!r} before the fields were read"
            ingest.bad_payload(self.device, f"{w.name}:{w.signal}", "inconsistent_snapshot",
                               f"{w.signal}={v!r}: {detail}", b"", None)

    # --- OPC UA events ---------------------------------------------------------------------

    def _event(self, src: _EventSource, values: list[ua.Variant], now: float) -> None:
        ingest = self.ingest
        if ingest is None:
            return
        index = src.index

        def prop(name: str) -> Any:
            i = index.get(name)
            if i is None or i >= len(values):
                return None
            v = values[i].Value
            return v.Text if isinstance(v, ua.LocalizedText) else v

        fields: dict[str, Any] = {}
        for field, name in src.fields.items():
            v = prop(name)
            enum = src.enums.get(field)
            fields[field] = enum.get(v, f"unknown({v})") if enum and isinstance(v, int) else v
        when = prop("Time") or prop("ReceiveTime")
        t = when.timestamp() if hasattr(when, "timestamp") else now
        if src.sequence is not None:
            seq = prop(src.sequence)
            ident = f"{seq}"
            if isinstance(seq, int):
                last = src.last_seq
                src.last_seq = seq
                step = (seq - last) % src.modulus if last is not None else 1
                if step > 1:
                    src.missed_total += step - 1
                    ingest.bad_payload(self.device, f"{src.name}:{src.sequence}", "counter_gap",
                                       f"{step - 1} event(s) missed: {last} -> {seq}", b"", None)
        else:
            # The server's EventId identifies the event: a re-sent one is dropped as a duplicate.
            event_id = prop("EventId") or b""
            ident = event_id.hex() if isinstance(event_id, bytes) else str(event_id)
        ingest.device_event(
            DeviceEvent(self.device, src.name, fields, t, now, f"{self.device}/{src.name}/{ident}"), None
        )

    def status(self) -> dict[str, Any]:
        gaps = {w.name: w.watch.missed_total for w in self.watchers if w.kind == "counter"}
        gaps.update({s.name: s.missed_total for s in self.sources if s.sequence})
        return {"state": self.health.state, "since": self.health.since,
                "last_error": self.health.last_error, "restarts": self.health.restarts,
                "notifications": self.notifications, "counter_gaps": gaps,
                "inconsistent_snapshots": {w.name: w.inconsistent for w in self.watchers},
                "paused": self._paused}
