"""The OPC UA connector against the asyncua sorter simulator over real TCP: events from
subscriptions, self-healing across a server restart with a namespace reorder, no duplicate
events from re-sent initial values, missing nodes named."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from edge_agent.config import OpcuaConnection
from edge_agent.connectors.opcua import OpcuaConnector
from edge_agent.profiles import load_profile
from edge_agent.profiles_opcua import OpcuaProfile
from edge_agent.runtime.clock import SystemClock
from edge_agent.runtime.supervisor import supervise
from edge_agent.testing.fakes import RecordingIngest
from simulators.opcua_sorter import Disposition, SorterSim

PROFILE = Path(__file__).parents[2] / "device_profiles" / "acme_sorter_opcua.yaml"
DISPOSITIONS = {0: "sorted", 1: "no_read", 2: "no_destination", 3: "lane_full", 4: "recirculated",
                5: "lost_mistrack"}


def variables_profile(fields_from: str = "notifications") -> OpcuaProfile:
    """The sorter read from its variables (no OPC UA events): fields bound to the counter."""
    sig = "nsu=urn:acme:sorter;s=Sorter1.{}"
    return OpcuaProfile.model_validate({
        "version": 1, "vendor": "ACME", "model": "SX-24 (variables)", "protocol": "opcua",
        "namespaces": {"sorter": "urn:acme:sorter"},
        "signals": {
            "induct_tracking_id": {"node": sig.format("Induct.TrackingId")},
            "induct_barcode": {"node": sig.format("Induct.Barcode")},
            "induct_count": {"node": sig.format("Induct.Count")},
            "divert_tracking_id": {"path": "sorter:Sorter1/sorter:Divert/sorter:TrackingId"},
            "divert_lane": {"node": sig.format("Divert.Lane")},
            "divert_disposition": {"node": sig.format("Divert.Disposition"), "enum": DISPOSITIONS},
            "divert_count": {"node": sig.format("Divert.Count")},
        },
        "events": {
            "induct": {"trigger": {"kind": "counter", "signal": "induct_count"},
                       "fields": {"tracking_id": "induct_tracking_id", "barcode": "induct_barcode"},
                       **({"fields_from": fields_from} if fields_from != "notifications"
                          else {})},
            "divert": {"trigger": {"kind": "counter", "signal": "divert_count"},
                       "fields": {"tracking_id": "divert_tracking_id", "lane": "divert_lane",
                                  "disposition": "divert_disposition"},
                       **({"fields_from": fields_from} if fields_from != "notifications"
                          else {})},
        },
    })


def shipped_profile() -> OpcuaProfile:
    prof = load_profile(PROFILE)
    assert isinstance(prof, OpcuaProfile)
    return prof


PROFILES = {"events": shipped_profile, "variables": variables_profile,
            "read": lambda: variables_profile("read")}


def connector(sim: SorterSim, profile: OpcuaProfile | None = None) -> OpcuaConnector:
    conn = OpcuaConnection(kind="opcua", endpoint=sim.endpoint, timeout_secs=2, keepalive_secs=0.5)
    prof = profile or load_profile(PROFILE)
    assert isinstance(prof, OpcuaProfile)
    return OpcuaConnector("SORTER1", conn, prof, SystemClock())


@contextlib.asynccontextmanager
async def running(c: OpcuaConnector):
    ingest = RecordingIngest()
    task = asyncio.create_task(supervise(c.name, lambda: c.run(ingest), c.health,
                                         initial_backoff_secs=0.3, max_backoff_secs=2.0))
    try:
        yield ingest
    finally:
        await c.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(pred, secs: float = 10.0) -> bool:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def diverts(ing: RecordingIngest) -> list:
    return [e for e in ing.events if e.event == "divert"]


async def test_inducts_and_diverts_become_device_events():
    async with SorterSim(rate=0, travel_secs=0.3) as sim:
        c = connector(sim)
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            await asyncio.sleep(0.5)  # initial values only set the baseline
            assert ing.events == []
            await sim.induct("S0000001", "C0000001", dispositions=(Disposition.SORTED,), lane=7)
            await sim.induct("S0000002", "", dispositions=(Disposition.NO_READ,))
            assert await until(lambda: len(diverts(ing)) == 2)
            d = {e.fields["tracking_id"]: e.fields for e in diverts(ing)}
            assert d["S0000001"]["lane"] == 7 and d["S0000001"]["disposition"] == "sorted"
            assert d["S0000002"]["disposition"] == "no_read"
            inducts = [e.fields for e in ing.events if e.event == "induct"]
            assert {"tracking_id": "S0000001", "barcode": "C0000001"} in inducts


@pytest.mark.parametrize("form", ["events", "variables"])
async def test_server_restart_with_reordered_namespaces_heals_without_duplicates(form):
    async with SorterSim(rate=20, seed=3, travel_secs=0.3) as sim:
        c = connector(sim, PROFILES[form]())
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            assert await until(lambda: len(diverts(ing)) >= 10)
            ns_before = sim.namespace_index
            await sim.restart(down_secs=1.0, reorder_namespaces=True)
            assert sim.namespace_index != ns_before
            t0 = time.monotonic()
            assert await until(lambda: c.health.restarts >= 1, 10)  # the outage was noticed
            n = len(diverts(ing))
            assert await until(lambda: c.health.state == "online" and len(diverts(ing)) > n + 5, 30)
            assert time.monotonic() - t0 < 30
            await asyncio.sleep(1.0)
            # Every divert confirmation exactly once: no duplicates from re-sent values.
            ids = [e.msg_id for e in diverts(ing)]
            assert len(ids) == len(set(ids))
            # Each divert's fields are that divert's (by its counter value).
            truth = {d["count"]: d for d in sim.diverts()}
            for e in diverts(ing):
                d = truth[int(e.msg_id.rsplit("/", 1)[1])]
                assert (e.fields["tracking_id"], e.fields["lane"], e.fields["disposition"]) == (
                    d["tracking_id"], d["lane"], d["disposition"])
            # Confirmations the server made while we were away are not silently absorbed:
            # they are reported as a gap, and seen + missed (+ reported inconsistent) = what
            # the server counted.
            gaps = c.status()["counter_gaps"]["divert"]
            reported = sum(int(b[3].split()[0]) for b in ing.bad
                           if b[1].startswith("divert:") and b[2] == "counter_gap")
            assert reported == gaps
            unbound = [b for b in ing.bad if b[2] == "inconsistent_snapshot"]
            first = min(int(e.msg_id.rsplit("/", 1)[1]) for e in diverts(ing))
            last = max(int(e.msg_id.rsplit("/", 1)[1]) for e in diverts(ing))
            assert len(diverts(ing)) + gaps + len(unbound) == last - first + 1


async def test_a_missing_node_is_a_clear_error_naming_it():
    data = variables_profile().model_dump()
    data["signals"]["induct_count"]["node"] = "nsu=urn:acme:sorter;s=Sorter1.Induct.Cnt"
    broken = OpcuaProfile.model_validate(data)
    async with SorterSim(rate=0) as sim:
        c = connector(sim, broken)
        async with running(c):
            assert await until(lambda: c.health.last_error is not None, 10)
            assert "induct_count" in c.health.last_error
            assert "Sorter1.Induct.Cnt" in c.health.last_error
            assert c.health.state == "offline"


def secure_connector(sim: SorterSim, pki: Path, **kw) -> OpcuaConnector:
    conn = OpcuaConnection(
        kind="opcua", endpoint=sim.endpoint, timeout_secs=4, keepalive_secs=1,
        security_policy="Basic256Sha256", security_mode="SignAndEncrypt", certificate_dir=pki,
        **kw,
    )
    prof = load_profile(PROFILE)
    assert isinstance(prof, OpcuaProfile)
    return OpcuaConnector("SORTER1", conn, prof, SystemClock())


async def test_sign_and_encrypt_with_a_trusted_server_certificate_and_a_password(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    async with SorterSim(rate=0, travel_secs=0.2, security="sign_encrypt",
                         users={"operator": "s3cret"}, cert_dir=tmp_path / "srv") as sim:
        c = secure_connector(sim, tmp_path / "pki", server_certificate=sim.server_certificate_path,
                             username="operator", password_file=tmp_path / "pw")
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online", 20), c.health.last_error
            assert (tmp_path / "pki" / "edge-agent-cert.der").exists()  # made on first start
            await asyncio.sleep(0.3)
            await sim.induct("S0000101", "C0000101", lane=3)
            assert await until(lambda: len(diverts(ing)) == 1)
            assert diverts(ing)[0].fields["lane"] == 3


async def test_an_untrusted_server_certificate_is_refused_with_a_clear_error(tmp_path):
    async with SorterSim(rate=0, security="sign_encrypt", cert_dir=tmp_path / "srv") as sim:
        c = secure_connector(sim, tmp_path / "pki", server_fingerprint="ab" * 32)
        async with running(c):
            assert await until(lambda: c.health.last_error is not None, 15)
            assert "refused the server certificate" in c.health.last_error
            assert "is not the pinned abab" in c.health.last_error
            assert c.health.state == "offline"


async def test_a_wrong_password_is_a_clear_error(tmp_path):
    (tmp_path / "pw").write_text("wrong")
    async with SorterSim(rate=0, security="sign_encrypt", users={"operator": "s3cret"},
                         cert_dir=tmp_path / "srv") as sim:
        c = secure_connector(sim, tmp_path / "pki", trust_any_server_certificate=True,
                             username="operator", password_file=tmp_path / "pw")
        async with running(c):
            assert await until(lambda: c.health.last_error is not None, 15)
            assert "BadUserAccessDenied" in c.health.last_error, c.health.last_error
            assert c.health.state == "offline"


async def test_opcua_events_become_device_events():
    async with SorterSim(rate=0) as sim:
        c = connector(sim)
        async with running(c) as ing:
            assert await until(lambda: c.health.state == "online")
            await asyncio.sleep(0.3)
            await sim.alarm("sorter jammed (fault 1001)", 800)
            assert await until(lambda: any(e.event == "alarm" for e in ing.events))
            ev = next(e for e in ing.events if e.event == "alarm")
            assert ev.fields == {"message": "sorter jammed (fault 1001)", "severity": 800}
            assert ev.msg_id.startswith("SORTER1/alarm/") and len(ev.msg_id) > 20


async def test_certificate_user_token_accepted_when_trusted_refused_when_not(tmp_path):
    from simulators.opcua_sorter import generate_certificate

    good, good_key = tmp_path / "user.der", tmp_path / "user.pem"
    bad, bad_key = tmp_path / "other.der", tmp_path / "other.pem"
    generate_certificate(good, good_key, app_uri="urn:edge-agent:user", common_name="operator")
    generate_certificate(bad, bad_key, app_uri="urn:edge-agent:other", common_name="intruder")
    async with SorterSim(rate=0, security="sign_encrypt", cert_dir=tmp_path / "srv",
                         user_certificates=[good]) as sim:
        ok = secure_connector(sim, tmp_path / "pki", trust_any_server_certificate=True,
                              user_certificate=good, user_private_key=good_key)
        async with running(ok):
            assert await until(lambda: ok.health.state == "online", 20), ok.health.last_error
        refused = secure_connector(sim, tmp_path / "pki", trust_any_server_certificate=True,
                                   user_certificate=bad, user_private_key=bad_key)
        async with running(refused):
            assert await until(lambda: refused.health.last_error is not None, 15)
            assert "BadUserAccessDenied" in refused.health.last_error


POLICY_MODES = [(p, m) for p in ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
                for m in ("Sign", "SignAndEncrypt")]
SERVER_NAMES = {"Basic256Sha256": "Basic256Sha256", "Aes128_Sha256_RsaOaep": "Aes128Sha256RsaOaep",
                "Aes256_Sha256_RsaPss": "Aes256Sha256RsaPss"}


async def test_every_security_policy_and_mode_streams(tmp_path):
    offered = [f"{SERVER_NAMES[p]}_{m}" for p, m in POLICY_MODES]
    async with SorterSim(rate=0, travel_secs=0.2, security="sign_encrypt",
                         cert_dir=tmp_path / "srv", secure_policies=offered) as sim:
        for i, (policy, mode) in enumerate(POLICY_MODES):
            conn = OpcuaConnection(
                kind="opcua", endpoint=sim.endpoint, timeout_secs=4, keepalive_secs=1,
                security_policy=policy, security_mode=mode, certificate_dir=tmp_path / "pki",
                server_certificate=sim.server_certificate_path,
            )
            prof = load_profile(PROFILE)
            assert isinstance(prof, OpcuaProfile)
            c = OpcuaConnector("SORTER1", conn, prof, SystemClock())
            async with running(c) as ing:
                online = await until(lambda c=c: c.health.state == "online", 20)
                assert online, (policy, mode, c.health.last_error)
                await asyncio.sleep(0.3)
                await sim.induct(f"S{i:07d}", f"C{i:07d}", lane=2)
                assert await until(lambda ing=ing: len(diverts(ing)) == 1), (policy, mode)


async def test_a_server_certificate_other_than_the_trusted_file_is_refused(tmp_path):
    from simulators.opcua_sorter import generate_certificate

    other, other_key = tmp_path / "other.der", tmp_path / "other.pem"
    generate_certificate(other, other_key, app_uri="urn:someone:else", common_name="else")
    async with SorterSim(rate=0, security="sign_encrypt", cert_dir=tmp_path / "srv") as sim:
        c = secure_connector(sim, tmp_path / "pki", server_certificate=other)
        async with running(c):
            assert await until(lambda: c.health.last_error is not None, 15)
            assert "refused the server certificate" in c.health.last_error
            assert "it is not the trusted" in c.health.last_error


@pytest.mark.parametrize("form", ["events", "variables"])
async def test_paused_reading_leaves_notifications_queued_on_the_server(form):
    """The outbox is full: publishing is disabled on the subscription, nothing is ingested
    while another client of the same server gets every divert, the notifications wait in
    the server's queues (none held by us), and at resume every divert arrives, once, with
    no gap."""
    async with SorterSim(rate=0, travel_secs=0.2) as sim:
        c = connector(sim, PROFILES[form]())
        other = connector(sim, PROFILES[form]())  # never paused: the yardstick
        async with running(c) as ing, running(other) as other_ing:
            assert await until(lambda: c.health.state == other.health.state == "online")
            await sim.induct("S0000001", "C0000001", lane=1)
            assert await until(lambda: len(diverts(ing)) == len(diverts(other_ing)) == 1)
            c.pause_reading()
            assert c.status()["paused"]
            for i in range(2, 7):
                await sim.induct(f"S{i:07d}", f"C{i:07d}", lane=i)
            # The unpaused client got them all, from the same server at the same interval.
            assert await until(lambda: len(diverts(other_ing)) == 6)
            assert len(diverts(ing)) == 1
            assert len(c._held) == 0  # queued on the server, not here
            c.resume_reading()
            assert await until(lambda: len(diverts(ing)) == 6), len(diverts(ing))
            assert [e.fields["tracking_id"] for e in diverts(ing)] == [
                f"S{i:07d}" for i in range(1, 7)]
            assert not [b for b in ing.bad if b[1].startswith("divert")], ing.bad
            assert not c.status()["paused"]
