"""Real network impairment for tests and benchmarks: namespaces, veth pairs, nftables loss, ``tc tbf`` caps.

A :class:`NetnsTopology` is a star of Linux network namespaces: one hub (the fusion node's host) and ``remotes``
remote namespaces (the agents' hosts), each joined to the hub by its own veth pair, so loss and bandwidth are set per
link. Everything is driven through ``ip``, ``nft`` and ``tc`` (iproute2 6.1 and nftables 1.0.6 here); it needs root
(``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``).

Facts this module relies on (measured on the test machines, see DESIGN.md "Facts about the test machines"):

- Loss is an nftables rule in the receiving namespace's input hook, ``numgen random mod 100 < N counter drop``,
  matched on the veth (``iifname``) so loopback traffic inside a namespace is never dropped. Its counters give the
  real drop share. The input hook sees reassembled IP datagrams: a fragmented UDP datagram is dropped whole.
- ``gso_max_size 1500`` (and ``gro_max_size 1500``) on both veth ends makes every skb one wire-sized segment;
  without it TCP hands veth 64 KB GSO bursts and the drop rule loses whole bursts instead of segments.
- ``tc tbf`` caps bandwidth on the remote's veth egress (agent -> hub uplink). ``tc netem`` is not in this kernel:
  delay and jitter need a user-space relay.
- IPv6 address generation is off on the veths (``addrgenmode none``), so no neighbour-discovery chatter is
  counted or dropped; the links carry IPv4 only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from types import TracebackType
from typing import Self

__all__ = ["ImpairmentError", "NetnsTopology", "impairment_unavailable"]

log = logging.getLogger(__name__)

#: Linux interface names hold at most 15 characters (IFNAMSIZ - 1).
MAX_IFNAME = 15
#: Seconds one ``ip``/``nft``/``tc`` call may take before it is reported as failed.
COMMAND_TIMEOUT_S = 10.0
#: Seconds to wait for both ends of a veth pair to report operstate UP.
LINK_UP_TIMEOUT_S = 5.0

_SEARCH_PATH = os.pathsep.join(filter(None, [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]))
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_TABLE = "impair"
_PROTOCOLS = (None, "udp", "tcp")


class ImpairmentError(RuntimeError):
    """A namespace, link, nftables or tc operation failed, or a topology cannot be built as asked."""


def _tool(name: str) -> str | None:
    """Absolute path of ``name`` (``ip``, ``nft``, ``tc``...), searching ``/usr/sbin`` and ``/sbin`` too."""
    return shutil.which(name, path=_SEARCH_PATH)


def _run(argv: list[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command; with ``check`` a non-zero exit raises :class:`ImpairmentError` naming it and its stderr."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=False)
    except FileNotFoundError as exc:
        raise ImpairmentError(f"`{shlex.join(argv)}` failed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImpairmentError(f"`{shlex.join(argv)}` timed out after {COMMAND_TIMEOUT_S:g} s") from exc
    if check and done.returncode != 0:
        err = " ".join((done.stderr or done.stdout).split()) or "no output"
        raise ImpairmentError(f"`{shlex.join(argv)}` failed (exit {done.returncode}): {err}")
    return done


def _ip() -> str:
    return _tool("ip") or "ip"


def _netns_list() -> set[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = _run([_ip(), "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@functools.lru_cache(maxsize=1)
def impairment_unavailable() -> str | None:
    """None when this process can build namespaces and impair them, else a one-line reason.

    Reasons: not root; ``ip``, ``nft`` or ``tc`` missing; creating a throwaway namespace, an nftables table or a
    ``tbf`` qdisc in it failed. The probe takes ~50 ms and its answer is cached for the process.
    """
    if os.geteuid() != 0:
        return "network impairment needs root (namespaces, nftables, tc)"
    missing = [name for name in ("ip", "nft", "tc") if _tool(name) is None]
    if missing:
        return f"network impairment needs {', '.join(missing)} (not found on PATH, /usr/sbin or /sbin)"
    probe = f"cpimp-probe-{os.getpid()}"
    ip, nft, tc = _ip(), _tool("nft") or "nft", _tool("tc") or "tc"
    try:
        _run([ip, "netns", "add", probe])
    except ImpairmentError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run([ip, "-n", probe, "link", "set", "lo", "up"])
        _run([ip, "netns", "exec", probe, nft, "add", "table", "inet", "probe"])
        _run([ip, "netns", "exec", probe, tc, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit",
              "burst", "32kbit", "latency", "400ms"])
    except ImpairmentError as exc:
        return f"cannot impair a network namespace: {exc}"
    finally:
        _run([ip, "netns", "del", probe], check=False)
    return None


def _numgen_threshold(percent: float) -> tuple[int, int]:
    """``(modulus, threshold)`` so that ``numgen random mod modulus < threshold`` drops ``percent`` %.

    Whole percents use ``mod 100``; finer ones ``mod 1000`` or ``mod 10000`` (0.01 % resolution, rounded).
    """
    for modulus in (100, 1000, 10000):
        threshold = percent * modulus / 100.0
        if abs(threshold - round(threshold)) < 1e-9:
            return modulus, round(threshold)
    return 10000, round(percent * 100.0)


class NetnsTopology:
    """A star of network namespaces: one hub (the fusion node's host) and ``remotes`` remote namespaces.

    Remote ``k`` (0-based) lives in namespace ``f"{prefix}-r{k}"`` and is joined to the hub ``f"{prefix}-hub"`` by
    its own veth pair: ``f"{prefix}r{k}a"`` (remote end, address ``10.{subnet}.{k}.1/24``) and ``f"{prefix}r{k}h"``
    (hub end, ``10.{subnet}.{k}.2/24``), so loss and bandwidth are set per link. Every namespace has ``lo`` up and
    an nftables ``table inet impair`` with one input-hook chain per link (``link{k}``) holding a counter rule for
    the packets seen on that veth and, once loss is set, the drop rule.

    Use as a context manager (or :meth:`open`/:meth:`close`): namespaces with this prefix left by an earlier run
    are deleted on entry, and this topology's namespaces are always deleted on exit, even on failure. Processes
    run inside a namespace with :meth:`exec_prefix`. Bad names (an interface name over 15 characters, a prefix
    that is not ``[A-Za-z][A-Za-z0-9_]*``, ``remotes`` outside 1..255, ``subnet`` outside 0..255) raise
    :class:`ImpairmentError` from the constructor, before anything is created.
    """

    def __init__(self, remotes: int, prefix: str = "cpn", subnet: int = 200) -> None:
        if not 1 <= remotes <= 255:
            raise ImpairmentError(f"remotes must be 1..255 (link k is the third octet of 10.{subnet}.k.x), got "
                                  f"{remotes}")
        if not 0 <= subnet <= 255:
            raise ImpairmentError(f"subnet must be 0..255 (second octet of 10.subnet.k.x), got {subnet}")
        if not _PREFIX_RE.match(prefix):
            raise ImpairmentError(f"prefix {prefix!r} must match [A-Za-z][A-Za-z0-9_]* (it names namespaces and "
                                  f"interfaces)")
        longest = self._veth_name(prefix, remotes - 1, "a")
        if len(longest) > MAX_IFNAME:
            raise ImpairmentError(f"prefix {prefix!r} makes interface name {longest!r} {len(longest)} characters "
                                  f"long; Linux allows at most {MAX_IFNAME}")
        self.remotes = remotes
        self.prefix = prefix
        self.subnet = subnet
        self.hub = f"{prefix}-hub"
        self._open = False
        self._created: list[str] = []

    # ---- names and addresses -------------------------------------------------------------------------------------

    @staticmethod
    def _veth_name(prefix: str, k: int, end: str) -> str:
        return f"{prefix}r{k}{end}"

    def _check_link(self, k: int) -> None:
        if not 0 <= k < self.remotes:
            raise ValueError(f"link {k} out of range: this topology has links 0..{self.remotes - 1}")

    @property
    def namespaces(self) -> list[str]:
        """All namespace names of this topology, hub first."""
        return [self.hub] + [self.remote(k) for k in range(self.remotes)]

    def remote(self, k: int) -> str:
        """Namespace name of remote ``k``: ``f"{prefix}-r{k}"``."""
        self._check_link(k)
        return f"{self.prefix}-r{k}"

    def remote_veth(self, k: int) -> str:
        """Interface name of link ``k``'s remote end (inside :meth:`remote`), e.g. ``cpnr0a``."""
        self._check_link(k)
        return self._veth_name(self.prefix, k, "a")

    def hub_veth(self, k: int) -> str:
        """Interface name of link ``k``'s hub end (inside :attr:`hub`), e.g. ``cpnr0h``."""
        self._check_link(k)
        return self._veth_name(self.prefix, k, "h")

    def hub_address(self, k: int) -> str:
        """IPv4 address of the hub side of link ``k``: ``f"10.{subnet}.{k}.2"`` (reachable from remote ``k``)."""
        self._check_link(k)
        return f"10.{self.subnet}.{k}.2"

    def remote_address(self, k: int) -> str:
        """IPv4 address of the remote side of link ``k``: ``f"10.{subnet}.{k}.1"`` (reachable from the hub)."""
        self._check_link(k)
        return f"10.{self.subnet}.{k}.1"

    def exec_prefix(self, namespace: str) -> list[str]:
        """Argv prefix that runs a command inside ``namespace``: ``[ip, "netns", "exec", namespace]``."""
        return [_ip(), "netns", "exec", namespace]

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    def _stale(self) -> list[str]:
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(hub|r\d+)$")
        return sorted(ns for ns in _netns_list() if pattern.match(ns))

    def open(self) -> Self:
        """Delete stale namespaces with this prefix, then build the star. On any failure, delete what was built."""
        if self._open:
            return self
        reason = impairment_unavailable()
        if reason is not None:
            raise ImpairmentError(reason)
        for ns in self._stale():
            log.info("deleting stale namespace %s", ns)
            _run([_ip(), "netns", "del", ns])
        try:
            self._build()
        except BaseException:
            self._delete_namespaces()
            raise
        self._open = True
        return self

    def _build(self) -> None:
        ip = _ip()
        for ns in self.namespaces:
            _run([ip, "netns", "add", ns])
            self._created.append(ns)
            _run([ip, "-n", ns, "link", "set", "lo", "up"])
        for k in range(self.remotes):
            remote, a, h = self.remote(k), self.remote_veth(k), self.hub_veth(k)
            # Both ends are created directly inside their namespaces: nothing is ever left in the root namespace.
            _run([ip, "link", "add", a, "netns", remote, "type", "veth", "peer", "name", h, "netns", self.hub])
            for ns, dev in ((remote, a), (self.hub, h)):
                _run([ip, "-n", ns, "link", "set", "dev", dev, "addrgenmode", "none"])
                # One wire-sized segment per skb, so TCP loses segments, not 64 KB GSO bursts.
                _run([ip, "-n", ns, "link", "set", "dev", dev, "gso_max_size", "1500"])
                _run([ip, "-n", ns, "link", "set", "dev", dev, "gro_max_size", "1500"], check=False)
                ethtool = _tool("ethtool")
                if ethtool is not None:
                    _run(self.exec_prefix(ns) + [ethtool, "-K", dev, "tso", "off", "gso", "off", "gro", "off"],
                         check=False)
                _run([ip, "-n", ns, "link", "set", "dev", dev, "up"])
        # Addresses and rules go in while the kernel's linkwatch (up to ~1 s here) brings the links to UP.
        for k in range(self.remotes):
            _run([ip, "-n", self.remote(k), "addr", "add", f"{self.remote_address(k)}/24", "dev", self.remote_veth(k)])
            _run([ip, "-n", self.hub, "addr", "add", f"{self.hub_address(k)}/24", "dev", self.hub_veth(k)])
        self._nft(self.hub, self._table_script([(k, self.hub_veth(k)) for k in range(self.remotes)]))
        for k in range(self.remotes):
            self._nft(self.remote(k), self._table_script([(k, self.remote_veth(k))]))
        self._wait_up()

    def _wait_up(self) -> None:
        """Poll ``ip -j link`` until every veth end reports operstate UP (bounded by :data:`LINK_UP_TIMEOUT_S`)."""
        pending = {(self.remote(k), self.remote_veth(k)) for k in range(self.remotes)}
        pending |= {(self.hub, self.hub_veth(k)) for k in range(self.remotes)}
        deadline = time.monotonic() + LINK_UP_TIMEOUT_S
        while True:
            for ns in {ns for ns, _ in pending}:
                links = json.loads(_run([_ip(), "-n", ns, "-j", "link", "show"]).stdout or "[]")
                up = {(ns, link["ifname"]) for link in links if link.get("operstate") == "UP"}
                pending -= up
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{dev} in {ns}" for ns, dev in sorted(pending))
                raise ImpairmentError(f"links not up after {LINK_UP_TIMEOUT_S:g} s: {names}")
            time.sleep(0.01)

    def _delete_namespaces(self) -> list[str]:
        """Delete every namespace this topology created; returns one message per failure (never raises)."""
        errors: list[str] = []
        for ns in reversed(self._created):
            try:
                _run([_ip(), "netns", "del", ns])
            except ImpairmentError as exc:
                errors.append(str(exc))
        self._created.clear()
        try:
            left = sorted(set(self.namespaces) & _netns_list())
        except ImpairmentError as exc:
            errors.append(str(exc))
        else:
            if left:
                errors.append(f"namespaces still present after delete: {', '.join(left)}")
        return errors

    def close(self) -> None:
        """Delete this topology's namespaces (their veths, rules and qdiscs go with them).

        Raises :class:`ImpairmentError` if one could not be deleted; every deletion is tried first.
        """
        self._open = False
        errors = self._delete_namespaces()
        if errors:
            raise ImpairmentError("; ".join(errors))

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        # An exception is already in flight: report cleanup trouble without masking it.
        self._open = False
        for error in self._delete_namespaces():
            log.error("cleaning up after %s: %s", exc_type.__name__, error)

    def _require_open(self) -> None:
        if not self._open:
            raise ImpairmentError(f"topology {self.prefix!r} is not up: use it as a context manager or call open()")

    # ---- nftables loss -------------------------------------------------------------------------------------------

    def _nft(self, namespace: str, script: str) -> None:
        _run(self.exec_prefix(namespace) + [_tool("nft") or "nft", "-f", "-"], stdin=script)

    @staticmethod
    def _table_script(chains: list[tuple[int, str]]) -> str:
        lines = [f"table inet {_TABLE} {{"]
        for k, dev in chains:
            lines += [f"  chain link{k} {{",
                      "    type filter hook input priority 0; policy accept;",
                      f'    iifname "{dev}" counter',
                      "  }"]
        lines.append("}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _chain_script(k: int, dev: str, percent: float, protocol: str | None) -> str:
        match = f'iifname "{dev}"' + (f" meta l4proto {protocol}" if protocol else "")
        chain = f"inet {_TABLE} link{k}"
        lines = [f"flush chain {chain}", f"add rule {chain} {match} counter"]
        if percent > 0:
            modulus, threshold = _numgen_threshold(percent)
            lines.append(f"add rule {chain} {match} numgen random mod {modulus} < {threshold} counter drop")
        return "\n".join(lines) + "\n"

    def set_loss(self, percent: float, *, link: int | None = None, both_ways: bool = True,
                 protocol: str | None = None) -> None:
        """Randomly drop ``percent`` % (0..100) of the packets arriving over ``link`` (None: every link).

        The rule is ``numgen random mod 100 < N counter drop`` in the receiving namespace's input chain, matching
        only that link's veth (``iifname``), so loopback traffic is never dropped. It always applies in the
        remote -> hub direction (hub's input); with ``both_ways`` also hub -> remote (the remote's input), else
        that direction is made lossless. ``protocol`` None drops any IP packet, ``"udp"``/``"tcp"`` only those.
        Fractional percents use ``mod 1000``/``mod 10000`` (0.01 % resolution). Replaces the link's previous loss
        setting and restarts its counters (:meth:`loss_counters`); 0 removes the drop rule.
        """
        self._require_open()
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be 0..100, got {percent}")
        if protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be None, 'udp' or 'tcp', got {protocol!r}")
        for k in self._links(link):
            self._nft(self.hub, self._chain_script(k, self.hub_veth(k), percent, protocol))
            self._nft(self.remote(k), self._chain_script(k, self.remote_veth(k), percent if both_ways else 0,
                                                         protocol if both_ways else None))

    def loss_counters(self) -> dict[str, dict[str, int]]:
        """Packets per direction since that link's loss was last set, read from the nftables counters.

        Keys ``"r{k}->hub"`` (counted in the hub's input) and ``"hub->r{k}"`` (the remote's input); values
        ``{"seen": packets that reached the loss rule (of the rule's protocol), "dropped": packets it dropped}``.
        ``dropped / seen`` is the real drop share.
        """
        self._require_open()
        counters: dict[str, dict[str, int]] = {}
        for ns, keys in [(self.hub, {f"link{k}": f"r{k}->hub" for k in range(self.remotes)})] + \
                [(self.remote(k), {f"link{k}": f"hub->r{k}"}) for k in range(self.remotes)]:
            out = _run(self.exec_prefix(ns) + [_tool("nft") or "nft", "-j", "list", "table", "inet", _TABLE]).stdout
            for key in keys.values():
                counters[key] = {"seen": 0, "dropped": 0}
            for item in json.loads(out)["nftables"]:
                rule = item.get("rule")
                if rule is None or rule.get("chain") not in keys:
                    continue
                packets = sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
                kind = "dropped" if any("drop" in e for e in rule["expr"]) else "seen"
                counters[keys[rule["chain"]]][kind] += packets
        return counters

    def _links(self, link: int | None) -> range:
        if link is None:
            return range(self.remotes)
        self._check_link(link)
        return range(link, link + 1)

    # ---- tc bandwidth --------------------------------------------------------------------------------------------

    def cap_bandwidth(self, rate: str | None = "2mbit", *, link: int | None = None, burst: str = "32kbit",
                      latency: str = "400ms") -> None:
        """Cap the remote -> hub uplink of ``link`` (None: every link) to ``rate`` with a token bucket.

        ``tc qdisc replace dev <remote veth> root tbf rate RATE burst BURST latency LATENCY`` on the remote's
        egress; units are tc's (``2mbit`` = 2,000,000 bit/s, ``32kbit`` = 4000 bytes of bucket, ``400ms`` of
        queue before tbf drops). ``rate`` None or ``""`` removes the cap.
        """
        self._require_open()
        tc = _tool("tc") or "tc"
        for k in self._links(link):
            prefix = self.exec_prefix(self.remote(k)) + [tc, "qdisc"]
            if rate:
                _run(prefix + ["replace", "dev", self.remote_veth(k), "root", "tbf", "rate", rate, "burst", burst,
                               "latency", latency])
            else:
                self._remove_qdisc(k)

    def _remove_qdisc(self, k: int) -> None:
        tc = self.exec_prefix(self.remote(k)) + [_tool("tc") or "tc", "qdisc"]
        dev = self.remote_veth(k)
        # Deleting the default (noqueue) root qdisc is refused; that already means "no cap".
        if " tbf " in _run(tc + ["show", "dev", dev]).stdout:
            _run(tc + ["del", "dev", dev, "root"])

    def clear(self) -> None:
        """Remove every loss rule and bandwidth cap (counters restart), keeping the namespaces and links."""
        self._require_open()
        self.set_loss(0)
        for k in range(self.remotes):
            self._remove_qdisc(k)
