"""The rules that send packets to the daemon's NFQUEUEs.

This kernel has no nftables ``queue`` statement (``CONFIG_NFT_QUEUE``), so the queue
rules go in through iptables' xt ``NFQUEUE`` target, in chains of our own
(``DIME_*``) hooked from the built-in chains by one rule each. Where the kernel has
``nft queue`` (Raspberry Pi OS kernels usually do), the same rules live in our own
nft table instead; :func:`nft_queue_supported` decides at start-up.

Every queue rule has ``--queue-bypass``: while no daemon listens, packets pass
untouched instead of being dropped.

What is queued:

* ``nfqueue`` mode: every TCP/UDP packet, outbound in mangle OUTPUT (priority
  -150, after conntrack, so conntrack saw identifiers) and inbound in raw
  PREROUTING (-300, before conntrack, so conntrack will see identifiers);
* ``nft`` mode: only the first packets (``ctstate NEW``) the kernel did not learn
  by itself, both ways: those its learn chains marked for the daemon
  (:data:`~stacktrans.nft.SYNC_MARK`) and those that came with a mark of their own
  (the learn chains use the mark, so they leave them alone). The kernel learns
  the rest, rewrites every later packet, and tells the daemon through NFLOG
  (:mod:`stacktrans.nflog`);
* both: ICMP errors, whose quoted headers need translating (inbound before
  conntrack, which matches them to connections by the quote).

Never queued: loopback, IHMP's own datagrams, multicast and broadcast.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from stacktrans.nft import INJECT_MARK, KNOCK_MARK, XFAM_MARK, Nft, NftError

COMMENT = "dime"
ICMP4_ERRORS = ("3", "4", "11", "12")  # unreachable, source quench, time exceeded, param
ICMP6_ERRORS = ("1", "2", "3", "4")  # unreachable, too big, time exceeded, param
BUILTIN_TABLES = ("mangle", "raw")


class QueueRulesError(RuntimeError):
    pass


def nft_queue_supported(nft: Nft) -> bool:
    """Whether the kernel takes the nftables ``queue`` statement (tried, then undone)."""
    probe = (
        "add table inet dime_probe\n"
        "add chain inet dime_probe c { type filter hook output priority 0; }\n"
        "add rule inet dime_probe c meta l4proto udp udp dport 9 queue num 9 bypass\n"
        "delete table inet dime_probe\n"
    )
    try:
        nft.run(probe)
    except NftError:
        return False
    return True


@dataclass
class XtQueueRules:
    """Queue rules through iptables/ip6tables (the xt NFQUEUE target)."""

    out_queue: int
    in_queue: int
    ihmp_port: int
    every_packet: bool  # nfqueue mode; else first packets and ICMP errors only
    created_tables: list[str] = field(default_factory=list)  # "ip mangle", ... (nft backend)

    def _chains(self, v6: bool) -> dict[str, list[str]]:
        """table -> iptables-restore lines for one family."""
        icmp = (
            [f"-p ipv6-icmp -m icmp6 --icmpv6-type {t}" for t in ICMP6_ERRORS]
            if v6
            else [f"-p icmp -m icmp --icmp-type {t}" for t in ICMP4_ERRORS]
        )
        port = self.ihmp_port

        def skip(chain: str, iface: str) -> list[str]:
            return [
                f"-A {chain} {iface} lo -j RETURN",
                f"-A {chain} -m mark --mark {INJECT_MARK:#x} -j RETURN",
                f"-A {chain} -p udp --sport {port} -j RETURN",
                f"-A {chain} -p udp --dport {port} -j RETURN",
                f"-A {chain} -m addrtype --dst-type MULTICAST -j RETURN",
                *([] if v6 else [f"-A {chain} -m addrtype --dst-type BROADCAST -j RETURN"]),
            ]

        def queue(chain: str, match: str, num: int) -> str:
            return f"-A {chain} {match} -j NFQUEUE --queue-num {num} --queue-bypass"

        new = "" if self.every_packet else " -m conntrack --ctstate NEW -m mark ! --mark 0"
        hook = f"-m comment --comment {COMMENT}"
        mangle = [
            ":DIME_OUT - [0:0]",
            f"-I OUTPUT 1 {hook} -j DIME_OUT",
            *skip("DIME_OUT", "-o"),
            queue("DIME_OUT", f"-m mark --mark {XFAM_MARK:#x}", self.out_queue),
            *(queue("DIME_OUT", f"-p {p}{new}", self.out_queue) for p in ("tcp", "udp")),
            *(queue("DIME_OUT", m, self.out_queue) for m in icmp),
        ]
        raw = [
            ":DIME_IN - [0:0]",
            f"-I PREROUTING 1 {hook} -j DIME_IN",
            *skip("DIME_IN", "-i"),
            *(queue("DIME_IN", m, self.in_queue) for m in icmp),
        ]
        if self.every_packet:
            raw += [queue("DIME_IN", f"-p {p}", self.in_queue) for p in ("tcp", "udp")]
        else:
            # First inbound packets, after conntrack classified them (mangle, -150).
            mangle += [
                ":DIME_NEW - [0:0]",
                f"-I PREROUTING 1 {hook} -j DIME_NEW",
                *skip("DIME_NEW", "-i"),
                queue("DIME_NEW", f"-m mark --mark {KNOCK_MARK:#x}", self.in_queue),
                queue("DIME_NEW", f"-m mark --mark {XFAM_MARK:#x}", self.in_queue),
                *(queue("DIME_NEW", f"-p {p}{new}", self.in_queue) for p in ("tcp", "udp")),
            ]
        return {"mangle": mangle, "raw": raw}

    def install(self, nft: Nft) -> None:
        """Add our chains and hooks. On failure, whatever was added is removed again."""
        self.created_tables = [
            f"{fam} {t}"
            for fam in ("ip", "ip6")
            for t in BUILTIN_TABLES
            if not nft.table_exists(fam, t)
        ]
        try:
            for v6 in (False, True):
                text = "".join(
                    f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n"
                    for table, lines in self._chains(v6).items()
                )
                _run(["ip6tables-restore" if v6 else "iptables-restore", "--noflush"], text)
        except QueueRulesError:
            self.remove(nft)
            raise

    def remove(self, nft: Nft | None) -> None:
        """Delete our hooks and chains, and the built-in tables iptables made for us."""
        for v6 in (False, True):
            tool = "ip6tables" if v6 else "iptables"
            for table, hooks in (("mangle", ("OUTPUT", "PREROUTING")), ("raw", ("PREROUTING",))):
                for hook in hooks:
                    for chain in ("DIME_OUT", "DIME_IN", "DIME_NEW"):
                        rule = [
                            tool,
                            "-w",
                            "-t",
                            table,
                            "-D",
                            hook,
                            "-m",
                            "comment",
                            "--comment",
                            COMMENT,
                            "-j",
                            chain,
                        ]
                        while _try(rule):
                            pass
                for chain in ("DIME_OUT", "DIME_IN", "DIME_NEW"):
                    _try([tool, "-w", "-t", table, "-F", chain])
                    _try([tool, "-w", "-t", table, "-X", chain])
        if nft is not None:
            for spec in self.created_tables:
                fam, name = spec.split()
                if nft.table_exists(fam, name) and _table_is_empty(nft, fam, name):
                    nft.run(f"delete table {fam} {name}")


def _table_is_empty(nft: Nft, family: str, name: str) -> bool:
    listing = nft.json(f"list table {family} {name}").get("nftables", [])
    return not any("rule" in item for item in listing)


def _run(argv: list[str], stdin: str) -> None:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise QueueRulesError(f"{argv[0]} is missing: apt-get install iptables") from exc
    if proc.returncode != 0:
        raise QueueRulesError(f"{argv[0]} failed: {proc.stderr.strip()}")


def _try(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except FileNotFoundError:
        return False


@dataclass
class ForwardIhmpRule:
    """``dime nat``'s one queue rule: IHMP this router forwards (UDP ``ihmp_port``
    either way), queued to ``queue`` in mangle FORWARD (chain ``DIME_NATFWD``), so
    the NAT can set NS on it and learn which hosts run dime."""

    queue: int
    ihmp_port: int
    created_tables: list[str] = field(default_factory=list)  # "ip mangle", ... (nft backend)

    def _lines(self) -> str:
        rule = f"-j NFQUEUE --queue-num {self.queue} --queue-bypass"
        return "\n".join(
            [
                "*mangle",
                ":DIME_NATFWD - [0:0]",
                f"-I FORWARD 1 -m comment --comment {COMMENT} -j DIME_NATFWD",
                f"-A DIME_NATFWD -p udp --dport {self.ihmp_port} {rule}",
                f"-A DIME_NATFWD -p udp --sport {self.ihmp_port} {rule}",
                "COMMIT",
                "",
            ]
        )

    def install(self, nft: Nft) -> None:
        self.remove(None)  # a predecessor's, after a crash
        self.created_tables = [
            f"{fam} mangle" for fam in ("ip", "ip6") if not nft.table_exists(fam, "mangle")
        ]
        for tool in ("iptables-restore", "ip6tables-restore"):
            try:
                _run([tool, "--noflush"], self._lines())
            except QueueRulesError:
                self.remove(nft)
                raise

    def remove(self, nft: Nft | None) -> None:
        """Our chain and hook, and the tables iptables made for them (if now empty)."""
        for tool in ("iptables", "ip6tables"):
            hook = [tool, "-w", "-t", "mangle", "-D", "FORWARD", "-m", "comment"]
            while _try([*hook, "--comment", COMMENT, "-j", "DIME_NATFWD"]):
                pass
            _try([tool, "-w", "-t", "mangle", "-F", "DIME_NATFWD"])
            _try([tool, "-w", "-t", "mangle", "-X", "DIME_NATFWD"])
        if nft is None:
            return
        for spec in self.created_tables:
            fam, name = spec.split()
            if nft.table_exists(fam, name) and _table_is_empty(nft, fam, name):
                nft.run(f"delete table {fam} {name}")
