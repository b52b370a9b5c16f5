"""OPC UA connector: subscribes to a server's nodes per the device profile, self-healing.

One connector per device (server). At every connect it resolves each signal's node by
namespace URI or browse path (namespace indexes may change between connects), checks that
every node exists (a missing one is a clear error naming it), creates one subscription and
its monitored items in batches, and reads ``mode: poll`` signals at their interval.

Self-healing: asyncua's own watchdog probes the session; on a loss (server restart, network
drop, failed secure channel renewal) the connector raises ``NotConnected`` and the
supervisor reconnects with backoff, resolving nodes and recreating the subscription anew.
The triggers' state lives on the connector across reconnects, so the current values a
server re-sends after a reconnect only set the baseline and never make duplicate events.

Consistency of an event's fields: each publish response is replayed in source-time order,
so fields a server writes before (or with) the trigger are read as of that trigger, even
when several triggers come in one batch. A server that *samples* independent variables on
their own clocks can report a trigger before the fields that go with it; such data needs a
structure variable or an OPC UA event to be consistent (not handled here yet).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from typing import Any

from asyncua import Client, Node, ua
from asyncua.common.subscription import Subscription
from asyncua.crypto import security_policies
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..config import OpcuaConnection
from ..errors import NotConnected, RetriableError
from ..events import DeviceEvent
from ..profiles_opcua import NODE_RE, OpcuaProfile
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


def _der(data: bytes) -> bytes:
    """A certificate file's DER bytes (files may be DER or PEM)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    return data


class _Watcher:
    def __init__(self, name: str, profile: OpcuaProfile):
        spec = profile.events[name]
        t = spec.trigger
        self.name = name
        self.signal = t.signal
        self.kind = t.kind
        self.watch = Watch(t.kind, modulus=t.modulus, deadband=t.deadband)
        self.fields = dict(spec.fields)


class OpcuaConnector:
    def __init__(self, device: str, conn: OpcuaConnection, profile: OpcuaProfile, clock: Clock):
        self.name = f"opcua:{device}"
        self.device = device
        self.conn = conn
        self.profile = profile
        self.clock = clock
        self.watchers = [_Watcher(n, profile) for n in profile.events]
        self.by_signal: dict[str, list[_Watcher]] = {}
        for w in self.watchers:
            self.by_signal.setdefault(w.signal, []).append(w)
        self.values: dict[str, Any] = {}
        self.health = Health()
        self.notifications = 0
        self.client: Client | None = None
        self.ingest: Ingest | None = None
        self._batch: list[tuple[float, bool, str, Any]] = []
        self._scheduled = False
        self._lost: asyncio.Future[None] | None = None
        self._stopping = False
        self._warned_blind_trust = False
        self._alarm_nodes: dict[str, Node] = {}
        self._alarm_by_source: dict[Any, str] = {}

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
        try:
            if c.user_certificate is not None and c.user_private_key is not None:
                # asyncua names these "client" but they are the X509 *user* identity token.
                await client.load_client_certificate(str(c.user_certificate))
                await client.load_private_key(str(c.user_private_key))
            if c.security_policy != "None":
                await self._secure(client)
            try:
                await asyncio.wait_for(client.connect(), c.timeout_secs * 2)
            except (OSError, TimeoutError, ua.UaError, asyncio.TimeoutError) as exc:
                raise NotConnected(f"{self.name}: cannot connect to {c.endpoint}: {exc!r}") from exc
            nodes = await self._resolve(client)
            sub = await self._subscribe(client, nodes)
            self.health.set("online")
            log.info("%s online: %d signals, subscription %s", self.name, len(nodes), sub.subscription_id)
            polled = {n: nodes[n] for n, s in self.profile.signals.items() if s.mode == "poll"}
            poll_task = asyncio.create_task(self._poll(polled)) if polled else None
            try:
                await self._lost
            finally:
                if poll_task:
                    poll_task.cancel()
        finally:
            self.client = None
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
        key, cert = pki / "edge-agent-key.pem", pki / "edge-agent-cert.der"
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

    async def stop(self) -> None:
        self._stopping = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

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
        self._alarm_nodes = {name: await locate(f"alarm '{name}'", a.source)
                             for name, a in self.profile.alarms.items()}
        # One batched read proves every node exists (and gives the first values).
        results = await client.read_attributes(list(nodes.values()), ua.AttributeIds.NodeClass)
        missing = [n for n, r in zip(nodes, results, strict=True) if not r.StatusCode.is_good()]
        if missing:
            where = ", ".join(f"{n} ({self.profile.signals[n].node or self.profile.signals[n].path})"
                              for n in missing)
            raise RetriableError(f"{self.name}: nodes not found on the server: {where}")
        return nodes

    async def _subscribe(self, client: Client, nodes: dict[str, Node]) -> Subscription:
        p = self.profile
        sub = await client.create_subscription(p.publishing_interval_ms, self)
        self._by_handle: dict[int, str] = {}
        names = [n for n, s in p.signals.items() if s.mode == "subscribe"]
        for i in range(0, len(names), p.items_per_call):
            batch = names[i : i + p.items_per_call]
            requests = [self._item_request(sub, n, nodes[n]) for n in batch]
            results = await sub.create_monitored_items(requests)
            bad = [f"{n} ({r})" for n, r in zip(batch, results, strict=True)
                   if isinstance(r, ua.StatusCode)]
            if bad:
                raise RetriableError(f"{self.name}: server refused monitored items: {', '.join(bad)}")
        self._alarm_by_source = {}
        for name, node in self._alarm_nodes.items():
            await sub.subscribe_events(sourcenode=node, evtypes=ua.ObjectIds.BaseEventType)
            self._alarm_by_source[node.nodeid] = name
        return sub

    def event_notification(self, event: Any) -> None:
        """An OPC UA event (alarm, AutoID read) from a notifier a profile alarm names."""
        name = self._alarm_by_source.get(getattr(event, "SourceNode", None))
        if name is None and len(self._alarm_by_source) == 1:
            name = next(iter(self._alarm_by_source.values()))
        if name is None or self.ingest is None:
            return
        fields: dict[str, Any] = {}
        for field, prop in self.profile.alarms[name].fields.items():
            v = getattr(event, prop, None)
            fields[field] = v.Text if isinstance(v, ua.LocalizedText) else v
        now = self.clock.now()
        event_id = getattr(event, "EventId", b"") or b""
        # The server's EventId identifies the event: a re-sent one is dropped as a duplicate.
        ident = event_id.hex() if isinstance(event_id, bytes) else str(event_id)
        self.ingest.device_event(
            DeviceEvent(self.device, name, fields, now, now, f"{self.device}/{name}/{ident}"), None
        )

    def _item_request(self, _sub: Subscription, name: str, node: Node) -> ua.MonitoredItemCreateRequest:
        s = self.profile.signals[name]
        params = ua.MonitoringParameters()
        params.ClientHandle = len(self._by_handle) + 1  # our subscription: our handles
        params.SamplingInterval = s.sampling_interval_ms
        params.QueueSize = s.queue_size
        params.DiscardOldest = s.discard_oldest
        if s.deadband is not None:
            f = ua.DataChangeFilter()
            f.Trigger = ua.DataChangeTrigger.StatusValue
            f.DeadbandType = 1 if s.deadband.kind == "absolute" else 2
            f.DeadbandValue = s.deadband.value
            params.Filter = f
        rv = ua.ReadValueId()
        rv.NodeId = node.nodeid
        rv.AttributeId = ua.AttributeIds.Value
        req = ua.MonitoredItemCreateRequest()
        req.ItemToMonitor = rv
        req.MonitoringMode = ua.MonitoringMode.Reporting
        req.RequestedParameters = params
        self._by_handle[params.ClientHandle] = name
        return req

    async def _poll(self, nodes: dict[str, Node]) -> None:
        names, node_list = list(nodes), list(nodes.values())
        while True:
            await asyncio.sleep(self.profile.poll_interval_ms / 1000)
            client = self.client
            if client is None:
                return
            try:
                values = await client.read_values(node_list)
            except (ua.UaError, OSError, TimeoutError) as exc:
                log.warning("%s: polled read failed: %s", self.name, exc)
                continue
            for n, v in zip(names, values, strict=True):
                self._changed(n, v)  # one read: fields and triggers of the same instant

    # --- notifications (asyncua calls these on the event loop) ------------------------------

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        name = self._by_handle.get(data.subscription_data.client_handle)
        if name is None:
            return
        self.notifications += 1
        dv = data.monitored_item.Value
        ts = dv.SourceTimestamp or dv.ServerTimestamp
        self._batch.append((ts.timestamp() if ts else 0.0, name in self.by_signal, name, val))
        if not self._scheduled:
            # Replay the whole publish response at once, in source-time order: a counter and
            # the fields written just before it often come in one batch, and a queued
            # counter may carry several steps whose fields must be matched to each step.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._replay)

    def status_change_notification(self, status: Any) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_exception(NotConnected(f"{self.name}: subscription status {status}"))

    def _replay(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        # Fields before triggers at the same instant (False sorts first); stable otherwise.
        batch.sort(key=lambda b: (b[0], b[1]))
        for _, _, name, val in batch:
            self._changed(name, val)

    def _changed(self, name: str, val: Any) -> None:
        enum = self.profile.signals[name].enum
        v = enum.get(val, f"unknown({val})") if enum and isinstance(val, int) else val
        self.values[name] = v
        for w in self.by_signal.get(name, ()):
            self._observe(w, v)

    def _observe(self, w: _Watcher, v: Any) -> None:
        ingest = self.ingest
        assert ingest is not None
        last = w.watch.last
        fire, missed = w.watch.observe(v)
        if missed:
            ingest.bad_payload(self.device, f"{w.name}:{w.signal}", "counter_gap",
                               f"{missed} event(s) missed: {last} -> {v}", b"", None)
        if fire:
            now = self.clock.now()
            fields = {f: self.values.get(s) for f, s in w.fields.items()}
            position = f"{v}" if w.kind == "counter" else f"{self.notifications}@{now!r}"
            ingest.device_event(
                DeviceEvent(self.device, w.name, fields, now, now, f"{self.device}/{w.name}/{position}"),
                None,
            )

    def status(self) -> dict[str, Any]:
        return {"state": self.health.state, "since": self.health.since,
                "last_error": self.health.last_error, "restarts": self.health.restarts,
                "notifications": self.notifications,
                "counter_gaps": {w.name: w.watch.missed_total for w in self.watchers
                                 if w.kind == "counter"}}
