"""What a run of StackTrans put into the kernel, recorded so that any later run can
remove it: after a clean stop, after ``kill -9``, after a crash.

Every kernel change is recorded *before* it is made (:meth:`Record.save`, an atomic
file replace), so the record is never behind the kernel. :func:`remove` takes away
what a record lists: our nft table, our iptables queue chains and their hooks, ghost
addresses and the routes we added. Nothing else in the ruleset or the address
configuration is touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacktrans import link_routes
from stacktrans.ghosts import Ghosts
from stacktrans.nft import Nft, NftError, NftTable
from stacktrans.queue_rules import XtQueueRules

log = logging.getLogger("dime.residue")

FILE = "residue.json"


@dataclass
class Residue:
    """What this run put into the kernel."""

    nft_table: bool = False
    xt_rules: dict[str, Any] | None = None
    ghosts: dict[str, Any] = field(default_factory=dict)  # Ghosts.state()
    #: What the control plane knew (IHMP's saved state), for a successor to resume.
    control: dict[str, Any] | None = None
    #: Flows of peers behind NATs: their ports there (Dataplane.bindings()).
    bindings: list[dict[str, Any]] = field(default_factory=list)
    #: Routing tables and rules by source address (:mod:`stacktrans.link_routes`).
    link_routes: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "nft_table": self.nft_table,
            "xt_rules": self.xt_rules,
            "ghosts": self.ghosts,
            "control": self.control,
            "bindings": self.bindings,
            "link_routes": self.link_routes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Residue:
        # "continuity": what records of earlier versions call the ghosts.
        ghosts = data.get("ghosts") or data.get("continuity") or {}
        control = data.get("control")
        bindings = data.get("bindings")
        return cls(
            bool(data.get("nft_table")),
            data.get("xt_rules"),
            dict(ghosts),
            control if isinstance(control, dict) else None,
            list(bindings) if isinstance(bindings, list) else [],
            bool(data.get("link_routes")),
        )


@dataclass
class Record:
    """The residue file of one run in ``directory`` (None: keep nothing on disk)."""

    directory: Path | None

    def save(self, residue: Residue) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (FILE + ".tmp")
        tmp.write_text(json.dumps(residue.to_json()))
        tmp.replace(self.directory / FILE)

    def load(self) -> Residue | None:
        if self.directory is None:
            return None
        try:
            return Residue.from_json(json.loads((self.directory / FILE).read_text()))
        except (OSError, ValueError):
            return None

    def discard(self) -> None:
        """Delete the record (everything it listed is gone)."""
        if self.directory is None:
            return
        (self.directory / FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()


async def remove(residue: Residue, nft: Nft | None, ghosts: Ghosts | None = None) -> None:
    """Remove everything ``residue`` says was installed; ``residue`` is updated as it
    goes. ``ghosts``: the live object, if this run still has it."""
    if ghosts is None:
        ghosts = Ghosts.from_state(residue.ghosts)
    await ghosts.clear()
    residue.ghosts = ghosts.state()
    if residue.xt_rules is not None:
        rules = XtQueueRules(
            0,
            0,
            0,
            every_packet=False,
            created_tables=list(residue.xt_rules.get("created_tables", [])),
        )
        try:
            rules.remove(nft)
        except NftError as exc:
            log.warning("removing queue rules: %s", exc)
        residue.xt_rules = None
    if residue.link_routes:
        try:
            link_routes.clear_leftovers()
        except OSError as exc:
            log.warning("removing routing by source: %s", exc)
        residue.link_routes = False
    if residue.nft_table and nft is not None:
        try:
            NftTable(nft, fast_path=False).uninstall()
        except NftError as exc:
            log.warning("removing table inet dime: %s", exc)
        residue.nft_table = False


async def clean_leftovers(record: Record) -> bool:
    """Remove what a dead run left behind, as its record lists. Returns whether any."""
    residue = record.load()
    if residue is None:
        return False
    try:
        nft: Nft | None = Nft()
    except NftError:
        nft = None
    await remove(residue, nft)
    record.discard()
    return True
