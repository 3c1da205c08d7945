"""A flow as IHMP names it (FLOW_BIND), the knock that carries it, and a NAT's
mapping of one (NAT_ENTRY).

Here, apart from the wire format, because StackTrans uses both: it builds knocks,
finds them in queued packets, and binds the flows they name.
"""

from __future__ import annotations

from dataclasses import dataclass

from ihmp.addr import IPAddress

__all__ = ["KNOCK_MAGIC", "FlowSpec", "NatMapping"]


#: Flows one FLOW_MOVE exchange moves (its FLOW and MORE_FLOWS fields).
MAX_FLOWS_PER_MOVE = 16


@dataclass(frozen=True)
class FlowSpec:
    """A flow as the sender of a FLOW_BIND sees it: its own (local) end and the
    receiver's (remote) end, identifiers both."""

    proto: int  # 6 TCP, 17 UDP
    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int


#: What a knock's transport payload starts with; a FLOW_BIND message follows.
KNOCK_MAGIC = b"DIMEknk1"


@dataclass(frozen=True)
class NatMapping:
    """A NAT's port mapping, as announced in NAT_ENTRY: internal <-> external."""

    proto: int  # 6 TCP, 17 UDP
    internal: IPAddress
    internal_port: int
    external: IPAddress
    external_port: int
