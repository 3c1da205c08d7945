"""Dependencies run one way: ``ihmp`` <- ``stacktrans`` <- ``dime``.

* ``ihmp/`` (the protocol, and the HID table it keeps) imports nothing of ours;
* ``stacktrans/`` takes from ``ihmp/`` only the table's and addresses' types;
* ``dime/`` wires both, and of StackTrans it knows only the service (and the
  rtnetlink client, which the address monitor shares with the ghosts, the heap
  trim, and the per-flow locator policy the config parses into).

Imports anywhere in a module count (also inside functions), found with ``ast``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest

from ihmp.cookie import CookieJar

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ihmp", "stacktrans", "dime")

#: package -> for each package of ours, the modules of it that may be imported
#: (None: any of them).
ALLOWED: dict[str, dict[str, frozenset[str] | None]] = {
    "ihmp": {"ihmp": None},
    "stacktrans": {
        "ihmp": frozenset({"ihmp.addr", "ihmp.flows", "ihmp.hosts"}),
        "stacktrans": None,
    },
    "dime": {
        "ihmp": None,
        "stacktrans": frozenset(
            {
                "stacktrans.service",
                "stacktrans.nat_router",
                "stacktrans.rtnl",
                "stacktrans.heap",
                "stacktrans.policy",
            }
        ),
        "dime": None,
    },
}


def imported_modules(source: str) -> set[str]:
    """Every absolute module an import statement of ``source`` names."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # "from ihmp import events" imports the module ihmp.events
            out.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if _is_module(f"{node.module}.{alias.name}")
            )
    return out


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(package: str, source: str) -> list[str]:
    bad = []
    rules = ALLOWED[package]
    for module in sorted(imported_modules(source)):
        top = module.split(".")[0]
        if top not in PACKAGES:
            continue
        if top not in rules:
            bad.append(module)
            continue
        allowed = rules[top]
        if allowed is not None and module != top and not _within(module, allowed):
            bad.append(module)
    return bad


def _within(module: str, allowed: frozenset[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def test_the_checker_sees_upward_imports() -> None:
    assert violations("ihmp", "from dime.config import Config") == ["dime.config"]
    assert violations("ihmp", "def f():\n    import stacktrans.nft\n") == ["stacktrans.nft"]
    assert "ihmp.engine" in violations("stacktrans", "from ihmp import engine")
    assert violations("stacktrans", "from ihmp.hosts import HostChanged") == []
    assert "stacktrans.nft" in violations("dime", "from stacktrans.nft import Nft")
    assert violations("dime", "from stacktrans.service import StackTrans") == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_against_the_layering(package: str) -> None:
    found = {
        str(path.relative_to(ROOT)): bad
        for path in sorted((ROOT / package).rglob("*.py"))
        if (bad := violations(package, path.read_text()))
    }
    assert found == {}


def test_the_daemon_does_not_load_heavy_packages() -> None:
    """``dime up`` imports neither pyroute2 (22 MiB of RSS for the whole package,
    whatever part is asked for) nor scapy, nor cryptography's serialization package
    (1.5 MiB; the host key is read without it); ``dime nat`` may load pyroute2."""
    code = (
        "import sys, dime.cli, dime.daemon, stacktrans.service\n"
        "heavy = ('pyroute2', 'scapy', 'cryptography.hazmat.primitives.serialization')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    assert _python(code) == ["[]"]


def test_the_dime_program_loads_neither_ssl_nor_libcrypto() -> None:
    """As ``dime up`` (and only then), asyncio goes without ssl and hashlib without
    _hashlib; the cookies' HMAC is the same with the builtin SHA-256."""
    code = (
        "import sys\n"
        "sys.argv = ['/usr/bin/dime', 'up']\n"
        "import dime.cli, dime.daemon\n"
        "from ipaddress import ip_address as a\n"
        "from ihmp.cookie import CookieJar\n"
        "print([m for m in ('ssl', '_hashlib') if sys.modules.get(m) is not None])\n"
        "print(CookieJar(bytes(32)).make(a('10.0.0.1'), 5, a('10.0.0.2'), 100.0).hex())\n"
    )
    out = _python(code)
    assert out[0] == "[]"
    mine = CookieJar(bytes(32)).make(ip_address("10.0.0.1"), 5, ip_address("10.0.0.2"), 100.0)
    assert out[1] == mine.hex()


def test_other_dime_commands_keep_ssl_and_the_fallback_takes_it_back() -> None:
    """``dime nat`` loads pyroute2, which imports ssl: only ``dime up`` keeps ssl out,
    and its own pyroute2 fallback (no /proc/net/nf_conntrack) takes ssl back first."""
    code = (
        "import sys\n"
        "sys.argv = ['/usr/bin/dime', 'nat']\n"
        "import dime.cli\n"
        "print(sys.modules.get('ssl', 'absent') is None)\n"
        "sys.modules['ssl'] = None\n"
        "from stacktrans.kernel_flows import conntrack_udp4\n"
        "conntrack_udp4()\n"
        "print('pyroute2' in sys.modules)\n"
    )
    assert _python(code) == ["False", "True"]


def _python(code: str) -> list[str]:
    """What ``code`` prints, run by a fresh interpreter in the repository, word by word."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
