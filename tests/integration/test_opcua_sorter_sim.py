"""The OPC UA sorter simulator, checked with a plain asyncua Client (no edge_agent code)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from simulators.opcua_sorter import (
    JAM_FAULT_CODE,
    NAMESPACE_URI,
    NO_LANE,
    REJECT_LANE,
    Disposition,
    DispositionMix,
    SorterSim,
    generate_certificate,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
NO_FAULTS = DispositionMix(0, 0, 0, 0, 0)
EXPECTED_TYPES = {
    "Sorter1.Induct.TrackingId": ua.VariantType.String,
    "Sorter1.Induct.Barcode": ua.VariantType.String,
    "Sorter1.Induct.Count": ua.VariantType.UInt32,
    "Sorter1.Divert.TrackingId": ua.VariantType.String,
    "Sorter1.Divert.Lane": ua.VariantType.Int32,
    "Sorter1.Divert.Disposition": ua.VariantType.Int32,
    "Sorter1.Divert.Count": ua.VariantType.UInt32,
    "Sorter1.State.Running": ua.VariantType.Boolean,
    "Sorter1.State.Jammed": ua.VariantType.Boolean,
    "Sorter1.State.FaultCode": ua.VariantType.UInt16,
    "Scanner1.LastRead.Barcode": ua.VariantType.String,
    "Scanner1.LastRead.TrackingId": ua.VariantType.String,
    "Scanner1.LastRead.Count": ua.VariantType.UInt32,
    "Scanner1.LastRead.NoRead": ua.VariantType.Boolean,
}


def node(client: Client, idx: int, name: str):
    return client.get_node(ua.NodeId(name, idx))


async def wait_for(predicate, timeout_secs: float = 5.0, interval_secs: float = 0.02):
    async with asyncio.timeout(timeout_secs):
        while not (result := await predicate()):
            await asyncio.sleep(interval_secs)
        return result


async def test_variables_readable_by_node_id_and_browse_path():
    async with SorterSim(rate=0, travel_secs=0.2) as sim:
        await sim.induct("T-READ-1", "BC-READ-1")
        async with Client(sim.endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            assert idx == sim.namespace_index == 2
            objects = client.nodes.objects
            for name, vtype in EXPECTED_TYPES.items():
                by_id = node(client, idx, name)
                by_path = await objects.get_child([f"{idx}:{part}" for part in name.split(".")])
                assert by_path.nodeid == by_id.nodeid == ua.NodeId(name, idx)
                dv = await by_id.read_data_value()
                assert dv.Value.VariantType == vtype, name
                assert (await by_path.read_value()) == dv.Value.Value
            assert await node(client, idx, "Sorter1.Induct.TrackingId").read_value() == "T-READ-1"
            assert await node(client, idx, "Sorter1.Induct.Barcode").read_value() == "BC-READ-1"
            assert await node(client, idx, "Sorter1.Induct.Count").read_value() == 1
            assert await node(client, idx, "Scanner1.LastRead.TrackingId").read_value() == "T-READ-1"
            assert await node(client, idx, "Sorter1.State.Running").read_value() is True
            browse_name = await node(client, idx, "Sorter1.Divert").read_browse_name()
            assert browse_name == ua.QualifiedName("Divert", idx)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, object]] = []

    def datachange_notification(self, node, val, data) -> None:
        self.changes.append((node.nodeid.Identifier, val))

    def values(self, name: str) -> list[object]:
        return [v for n, v in self.changes if n == name]


async def test_subscription_sees_counts_divert_fields_and_jams():
    async with SorterSim(rate=25, seed=7, travel_secs=0.2, mix=NO_FAULTS,
                         jam_every=4, jam_secs=0.2) as sim:
        async with Client(sim.endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            recorder = Recorder()
            sub = await client.create_subscription(20, recorder)
            names = ["Sorter1.Induct.Count", "Sorter1.Divert.Count", "Sorter1.Divert.TrackingId",
                     "Sorter1.Divert.Lane", "Sorter1.Divert.Disposition",
                     "Sorter1.State.Jammed", "Sorter1.State.FaultCode"]
            await sub.subscribe_data_change([node(client, idx, n) for n in names])

            async def enough() -> bool:
                return (len(recorder.values("Sorter1.Induct.Count")) >= 5
                        and len(recorder.values("Sorter1.Divert.Count")) >= 5
                        and recorder.values("Sorter1.State.Jammed")[-2:] == [True, False])

            await wait_for(enough)
            await sub.delete()
        truth = {c["tracking_id"]: c for c in sim.ground_truth()}
    for name in ("Sorter1.Induct.Count", "Sorter1.Divert.Count"):
        counts = recorder.values(name)
        assert counts == sorted(counts) and counts[-1] > counts[0], (name, counts)
    divert_ids = [v for v in recorder.values("Sorter1.Divert.TrackingId") if v]
    assert divert_ids and all(t in truth for t in divert_ids)
    lanes = [v for v in recorder.values("Sorter1.Divert.Lane") if v != NO_LANE]
    assert lanes and all(1 <= lane <= sim.lanes for lane in lanes)
    assert set(recorder.values("Sorter1.Divert.Disposition")) == {int(Disposition.SORTED)}
    assert set(recorder.values("Sorter1.State.FaultCode")) == {0, JAM_FAULT_CODE}


async def test_scripted_cartons_confirm_expected_lane_and_disposition():
    async with SorterSim(rate=0, travel_secs=0.15, recirc_secs=0.15) as sim:
        async with Client(sim.endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)

            async def next_confirmation(after: int) -> tuple[str, int, int]:
                count = node(client, idx, "Sorter1.Divert.Count")

                async def advanced() -> bool:
                    return await count.read_value() > after

                await wait_for(advanced)
                return (
                    await node(client, idx, "Sorter1.Divert.TrackingId").read_value(),
                    await node(client, idx, "Sorter1.Divert.Lane").read_value(),
                    await node(client, idx, "Sorter1.Divert.Disposition").read_value(),
                )

            seen = 0
            sorted_lane = sim.lane_for("BC-1")
            await sim.induct("T-1", "BC-1")
            assert await next_confirmation(seen) == ("T-1", sorted_lane, Disposition.SORTED)
            seen += 1

            await sim.induct("T-2", "BC-2", dispositions=[Disposition.NO_READ])
            assert await node(client, idx, "Scanner1.LastRead.NoRead").read_value() is True
            assert await node(client, idx, "Sorter1.Induct.Barcode").read_value() == ""
            assert await next_confirmation(seen) == ("T-2", REJECT_LANE, Disposition.NO_READ)
            seen += 1

            await sim.induct("T-3", "BC-3", lane=7, dispositions=[
                Disposition.RECIRCULATED, Disposition.RECIRCULATED, Disposition.SORTED])
            for expected in [("T-3", NO_LANE, Disposition.RECIRCULATED)] * 2 + [
                    ("T-3", 7, Disposition.SORTED)]:
                assert await next_confirmation(seen) == expected
                seen += 1

            await sim.induct("T-4", "BC-4", dispositions=[Disposition.LOST_MISTRACK])
            assert await next_confirmation(seen) == ("T-4", NO_LANE, Disposition.LOST_MISTRACK)
            seen += 1
            assert await node(client, idx, "Sorter1.Induct.Count").read_value() == 4

    truth = {c["tracking_id"]: c for c in sim.ground_truth()}
    assert truth["T-1"]["final_lane"] == sorted_lane
    assert truth["T-2"]["read"] is False and truth["T-2"]["final_disposition"] == "no_read"
    assert truth["T-3"]["dispositions"] == ["recirculated", "recirculated", "sorted"]
    assert truth["T-3"]["lanes"] == [NO_LANE, NO_LANE, 7]
    assert truth["T-4"]["final_disposition"] == "lost_mistrack"
    assert all(c["done"] and c["scripted"] for c in truth.values())


async def test_restart_keeps_port_and_state_and_reorders_namespaces(tmp_path):
    truth_file = tmp_path / "truth.json"
    async with SorterSim(rate=20, seed=3, travel_secs=0.2,
                         ground_truth_path=truth_file) as sim:
        endpoint = sim.endpoint
        async with Client(endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            assert idx == 2

            async def some_diverts() -> bool:
                return await node(client, idx, "Sorter1.Divert.Count").read_value() >= 3

            await wait_for(some_diverts)
        before = len(sim.ground_truth())
        in_flight = [c["tracking_id"] for c in sim.ground_truth() if not c["done"]]

        restarting = asyncio.create_task(sim.restart(down_secs=0.5))
        await asyncio.sleep(0.2)
        with pytest.raises((OSError, asyncio.TimeoutError)):
            async with Client(endpoint, timeout=1):
                pass
        await restarting
        assert sim.endpoint == endpoint and truth_file.exists()
        async with Client(endpoint, timeout=5) as client:
            assert await client.get_namespace_index(NAMESPACE_URI) == 2
            count = await node(client, 2, "Sorter1.Induct.Count").read_value()
            assert count >= before

        await sim.restart(down_secs=0, reorder_namespaces=True)
        assert sim.namespace_index == 3
        async with Client(endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            assert idx == 3
            assert await node(client, idx, "Sorter1.Induct.Count").read_value() >= count
            # A client holding the old index now points at nothing.
            with pytest.raises(ua.UaStatusCodeError):
                await node(client, 2, "Sorter1.Induct.Count").read_value()
            sim.pause()

            async def drained() -> bool:
                return all(c["done"] for c in sim.ground_truth())

            await wait_for(drained)
            total = len(sim.ground_truth())
            assert await node(client, idx, "Sorter1.Induct.Count").read_value() == total
    truth = {c["tracking_id"]: c for c in sim.ground_truth()}
    assert all(truth[t]["done"] for t in in_flight)
    # Written again by stop(), with every carton.
    assert '"tracking_id"' in truth_file.read_text()
    assert truth_file.read_text().count('"tracking_id"') == total


@pytest.fixture
def client_cert(tmp_path):
    cert, key = tmp_path / "client_cert.der", tmp_path / "client_key.pem"
    generate_certificate(cert, key, app_uri="urn:acme:test:client", common_name="test client")
    return cert, key


async def secure_client(sim: SorterSim, client_cert, user=None, password=None) -> Client:
    client = Client(sim.endpoint, timeout=5)
    client.application_uri = "urn:acme:test:client"
    cert, key = client_cert
    await client.set_security(
        SecurityPolicyBasic256Sha256, str(cert), str(key),
        server_certificate=str(sim.server_certificate_path),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    return client


def ignore_offered_endpoints(monkeypatch):
    """Make asyncua's client skip its endpoint check, as a sloppy client would, so that it
    is the server that has to refuse the session."""
    monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, mode, uri: eps[0]))


async def test_sign_encrypt_with_users(tmp_path, client_cert, monkeypatch):
    async with SorterSim(rate=0, security="sign_encrypt", users={"operator": "s3cret"},
                         cert_dir=tmp_path / "pki") as sim:
        assert sim.server_certificate_path.is_file()
        async with await secure_client(sim, client_cert, "operator", "s3cret") as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            assert await node(client, idx, "Sorter1.State.Running").read_value() is True

        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with await secure_client(sim, client_cert, "operator", "wrong"):
                pass
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with await secure_client(sim, client_cert, "intruder", "s3cret"):
                pass
        with pytest.raises(ua.UaError):  # anonymous: no such token policy on offer
            async with await secure_client(sim, client_cert):
                pass
        with pytest.raises(ua.UaError):  # None security: no such endpoint on offer
            async with Client(sim.endpoint, timeout=5):
                pass
        ignore_offered_endpoints(monkeypatch)
        plain = Client(sim.endpoint, timeout=5)
        plain.set_user("operator")
        plain.set_password("s3cret")
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with plain:
                pass


async def test_sign_encrypt_refuses_unencrypted_channel(tmp_path, client_cert, monkeypatch):
    async with SorterSim(rate=0, security="sign_encrypt", cert_dir=tmp_path / "pki") as sim:
        async with await secure_client(sim, client_cert) as client:  # anonymous, encrypted
            assert await client.get_namespace_index(NAMESPACE_URI) == 2
        ignore_offered_endpoints(monkeypatch)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with Client(sim.endpoint, timeout=5):
                pass


async def test_cli_prints_ready_and_exits_on_sigterm(tmp_path):
    truth = tmp_path / "truth.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.opcua_sorter", "--port", "0", "--rate", "20",
         "--seed", "5", "--travel-secs", "0.1", "--ground-truth", str(truth)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)
        assert line.startswith("READY sorter endpoint=opc.tcp://127.0.0.1:"), line
        endpoint = line.split("endpoint=")[1].split()[0]
        async with Client(endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            count = node(client, idx, "Sorter1.Divert.Count")

            async def diverted() -> bool:
                return await count.read_value() > 0

            await wait_for(diverted)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert truth.read_text().count('"tracking_id"') >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


class Stamps:
    """Every notification of a subscription: (node name, value, SourceTimestamp)."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, object, object]] = []
        self.events: list[object] = []

    def datachange_notification(self, node, val, data) -> None:
        self.changes.append((node.nodeid.Identifier, val, data.monitored_item.Value.SourceTimestamp))

    def event_notification(self, event) -> None:
        self.events.append(event)


async def subscribe(client: Client, idx: int, names: list[str], handler) -> None:
    sub = await client.create_subscription(50, handler)
    await sub.subscribe_data_change([node(client, idx, n) for n in names], queuesize=10000)
    for type_name, notifier in (("DivertConfirmedEventType", "Sorter1.Divert"),
                                ("InductedEventType", "Sorter1.Induct")):
        await sub.subscribe_events(node(client, idx, notifier), node(client, idx, type_name),
                                   queuesize=10000)


async def test_realistic_by_default_ms_stamps_collide_clock_off_events_carry_fields():
    async with SorterSim(rate=200, seed=2, travel_secs=0.1, mix=NO_FAULTS) as sim:
        async with Client(sim.endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            st = Stamps()
            await subscribe(client, idx, ["Sorter1.Divert.Count"], st)

            async def enough() -> bool:
                return len(st.changes) > 100 and len(st.events) > 100

            await wait_for(enough, 30)
            sim.pause()
        host = time.time()
    stamps = [ts for _, _, ts in st.changes[1:]]
    assert all(ts.microsecond % 1000 == 0 for ts in stamps)  # milliseconds
    assert len(set(stamps)) < len(stamps)  # several diverts in one millisecond
    assert 1.0 < stamps[-1].timestamp() - host < 3.0  # the device clock is ~2 s ahead
    truth = {d["count"]: d for d in sim.diverts()}
    diverts = [e for e in st.events if hasattr(e, "Lane")]
    for e in diverts:  # each event carries its own divert's fields
        d = truth[e.Count]
        assert (e.TrackingId, e.Lane, Disposition(e.Disposition).label) == (
            d["tracking_id"], d["lane"], d["disposition"])
    inducts = {i["count"]: i for i in sim.inducts()}
    assert all(inducts[e.Count]["tracking_id"] == e.TrackingId
               for e in st.events if hasattr(e, "Barcode"))


async def test_sampled_mode_skips_values_and_warm_up_cartons_precede_any_client():
    async with SorterSim(rate=100, seed=4, travel_secs=0.1, sampling_ms=60, warmup_cartons=5,
                         mix=NO_FAULTS) as sim:
        async with Client(sim.endpoint, timeout=5) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            # Inducted before anyone could subscribe: the count starts at the warm-up.
            assert await node(client, idx, "Sorter1.Induct.Count").read_value() >= 5
            st = Stamps()
            await subscribe(client, idx, ["Sorter1.Divert.Count"], st)

            async def enough() -> bool:
                return len(sim.diverts()) > 100

            await wait_for(enough, 30)
            sim.pause()
    counts = [v for _, v, _ in st.changes]
    assert counts == sorted(counts)
    assert max(b - a for a, b in zip(counts, counts[1:], strict=False)) > 1  # values skipped
    assert len(counts) < len(sim.diverts())
    assert sim.ground_truth()[0]["index"] == 0 and len(sim.inducts()) >= 5
