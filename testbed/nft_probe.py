"""Which rules of dime's nft ruleset does this kernel refuse? (``./quickstart arm64 probe``)

Each ruleset is loaded whole into a scratch network namespace; if the kernel refuses
it, its tables go in with empty chains and then every rule on its own, so that each
refused rule is named with nft's error. The rulesets: what :mod:`stacktrans.service`
installs (the nft data plane and the nfqueue mode, each with and without the nft
queue rules), and any ruleset files given on the command line. Prints lines
``DIME-ARM64 nft-ruleset: NAME: accepted`` (or ``refused, N of M rules``) and
``DIME-ARM64 nft-refused: NAME: FAMILY CHAIN: RULE: ERROR``. Must run as root.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from stacktrans.nft import QueueSpec, ruleset
from stacktrans.service import DataplaneConfig

NETNS = "dime-nft-probe"


def dime_rulesets() -> dict[str, str]:
    """The rulesets dime installs, with the arguments stacktrans.service gives."""
    c = DataplaneConfig()
    out: dict[str, str] = {}
    for mode, fast in (("nft", True), ("nfqueue", False)):
        for queued in (True, False):
            queue = QueueSpec(c.queue_out, c.queue_in, c.ihmp_port, not fast) if queued else None
            name = f"{mode}-mode{'+nft-queue' if queued else ''}"
            out[name] = ruleset(
                fast_path=fast,
                queue=queue,
                ihmp_port=c.ihmp_port,
                log_group=c.log_group if fast else None,
                held_log_group=c.held_log_group if fast else None,
            )
    return out


def split(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The ruleset with empty chains (their hooks kept), and its rules as
    (family, chain, rule). Knows the layout :func:`stacktrans.nft.ruleset` writes:
    one table, set, chain or rule a line."""
    skeleton: list[str] = []
    rules: list[tuple[str, str, str]] = []
    family = chain = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("table "):
            family = s.split()[1]
        elif s.startswith("chain "):
            chain = s.split()[1]
        elif chain and s == "}":
            chain = ""
        elif chain and not s.startswith("type "):
            rules.append((family, chain, s))
            continue
        skeleton.append(line)
    return "\n".join(skeleton) + "\n", rules


def nft(text: str) -> str | None:
    """Loads ``text`` in the scratch namespace: None, or nft's error (first line)."""
    r = subprocess.run(
        ["ip", "netns", "exec", NETNS, "nft", "-f", "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode == 0:
        return None
    errors = [x[x.index("Error:") :] for x in r.stderr.splitlines() if "Error:" in x]
    return errors[0] if errors else r.stderr.strip() or f"nft: exit {r.returncode}"


def probe(name: str, text: str) -> int:
    """Prints what the kernel refuses of ``text``; returns how many rules."""
    nft("flush ruleset\n")
    err = nft(text)
    if err is None:
        print(f"DIME-ARM64 nft-ruleset: {name}: accepted", flush=True)
        return 0
    nft("flush ruleset\n")
    skeleton, rules = split(text)
    err = nft(skeleton)
    if err is not None:
        print(f"DIME-ARM64 nft-ruleset: {name}: tables refused: {err}", flush=True)
        return len(rules)
    refused = 0
    for family, chain, rule in rules:
        err = nft(f"add rule {family} dime {chain} {rule}\n")
        if err is not None:
            refused += 1
            print(f"DIME-ARM64 nft-refused: {name}: {family} {chain}: {rule}: {err}", flush=True)
    print(f"DIME-ARM64 nft-ruleset: {name}: refused, {refused} of {len(rules)} rules", flush=True)
    return refused


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="more rulesets (nft -f files)")
    args = ap.parse_args()
    rulesets = dime_rulesets()
    rulesets.update({p.name: p.read_text() for p in args.files})
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        refused = sum(probe(name, text) for name, text in rulesets.items())
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
