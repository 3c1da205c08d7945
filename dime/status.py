"""What ``dime status`` shows: one JSON object built from the engine and StackTrans.

The keys are a contract (``dime status --json`` is read by scripts and tests); add
to them freely, never rename them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ihmp.engine import IhmpEngine
from stacktrans.service import StackTrans


def build(
    *,
    port: int,
    started_at: float,
    engine: IhmpEngine | None,
    service: StackTrans | None,
    now: float,
) -> dict[str, Any]:
    """``now``: the engine's clock."""
    return {
        "pid": os.getpid(),
        "uptime": round(time.time() - started_at, 1),
        "dataplane": service.mode.value if service is not None else "-",
        "port": port,
        "local_addresses": [str(a) for a in (engine.local_addresses if engine else [])],
        "ghosts": sorted(str(a) for a in (service.ghosts.addresses if service else [])),
        "hids": _hids(engine),
        "sockets": service.flows() if service is not None else [],
        "counters": _counters(engine, service),
        "limits": _limits(engine),
        # Each configured rendezvous point: {server (as configured), registered, ...}.
        "rendezvous": engine.rendezvous_status(now) if engine is not None else [],
        # The locator policy in force (the config's [[policy]], as `dime reload` left it).
        "policy": service.policy_json() if service is not None else [],
    }


def _hids(engine: IhmpEngine | None) -> list[dict[str, Any]]:
    if engine is None:
        return []
    return [
        {
            "hid": e.hid,
            "active": [str(a) for a in e.active],
            "unreachable": sorted(str(a) for a in e.unreachable),
            "local": [str(a) for a in e.local],
            "key": e.key.hex() if e.key else None,
            "state": e.state.value,
            # Behind a NAT: the NAT's address is its locator (observed_addr), and
            # its own address (behind_nat_addr) names it.
            "behind_nat": e.locator in e.nat,
            "observed_addr": str(e.locator) if e.locator in e.nat else None,
            "behind_nat_addr": str(e.nat[e.locator]) if e.locator in e.nat else None,
            **_we_are_natted(engine, e.hid),
        }
        for e in engine.table
    ]


def _we_are_natted(engine: IhmpEngine, hid: int) -> dict[str, Any]:
    """Whether this host reaches the peer through a NAT, as the peer sees it."""
    seen = engine.peer_info(hid).get("we_are_observed_as")
    return {"we_are_behind_nat": seen is not None, "we_are_observed_as": seen}


def _limits(engine: IhmpEngine | None) -> dict[str, float]:
    """The flood limits in force (``[ihmp]`` in the config); each has a counter."""
    if engine is None:
        return {}
    c = engine.config
    names = (
        "max_peers",
        "max_half_open",
        "max_challenges",
        "unverified_rate",
        "cookie_rate",
        "knock_rate",
        "relay_rate",
    )
    return {name: getattr(c, name) for name in names}


def _counters(engine: IhmpEngine | None, service: StackTrans | None) -> dict[str, Any]:
    counters: dict[str, Any] = {
        "messages_sent": 0,
        "messages_received": 0,
        "messages_rejected": {},
    }
    if engine is not None:
        c = engine.counters
        counters = {
            "messages_sent": c.messages_sent,
            "messages_received": c.messages_received,
            "messages_rejected": dict(c.messages_rejected),
            "retransmissions": c.retransmissions,
            # What an attacker can make us spend, and what we refused (issue: security).
            "dropped": dict(c.dropped),
            "cookies_sent": c.cookies_sent,
            "challenges_sent": c.challenges_sent,
            "addresses_validated": c.addresses_validated,
            "peers_evicted": c.peers_evicted,
            "keepalives_sent": c.keepalives_sent,
            "flows_bound": c.flows_bound,
            "flow_moves_sent": c.flow_moves_sent,
            "flow_moves_received": c.flow_moves_received,
            "registrations_sent": c.registrations_sent,
            "relays_sent": c.relays_sent,
            "relayed_received": c.relayed_received,
            "peers": len(engine.table),
            "peers_half_open": engine.half_open(),
        }
    counters["packets_translated_in_user_space"] = 0
    if service is not None:
        counters.update(service.counters())
    return counters
