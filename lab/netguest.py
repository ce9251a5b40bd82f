"""Network-lab guests: busybox guests with a virtio NIC, for the virtual network (``tmdht vnet``).

The lab's default guests (:func:`tmdht.lab.capture.default_specs`) have no usable NIC: the cloud
kernel has no e1000e driver and their initramfs holds only busybox. A *net guest* boots the same
kernel with its own initramfs (:func:`ensure_net_initramfs`): busybox, the virtio-net modules of
that kernel (``virtio_ring virtio virtio_pci_* failover net_failover virtio_net``, loaded by
``netinit.sh``), and ``vnetprobe`` (``vnetprobe.c``, compiled static with gcc): a UDP echo on
port 9000 that counts what it receives, and a TCP sink/source for throughput. The guest's
address comes from the kernel command line (``tmdht.ip=``, :class:`NetGuestSpec`).

Its NIC is a ``virtio-net-pci`` whose backend the caller chooses: a ``-netdev stream`` unix
socket for a tmdht vnet agent (:func:`stream_nic_args`) or a tap device on a Linux bridge
(:func:`tap_nic_args`). Commands run in the guest through its serial console
(:func:`run_in_guest`). Nothing here touches the default guests' inputs: their capture keys stay
the same.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tmdht.lab.errors import GuestError, GuestTimeoutError, LabSetupError, UsageError
from tmdht.lab.guest import Guest, GuestSpec
from tmdht.lab.host import HostTools, find_program
from tmdht.lab.initramfs import pack_cpio

__all__ = [
    "NET_MODULES",
    "PROBE_TCP_PORT",
    "PROBE_UDP_PORT",
    "NetGuestSpec",
    "build_net_initramfs",
    "ensure_net_initramfs",
    "kernel_release",
    "run_in_guest",
    "stream_nic_args",
    "tap_nic_args",
]

NET_MODULES: Final = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
)
"""The modules a virtio NIC needs with the Debian cloud kernel, in load order."""
PROBE_UDP_PORT: Final = 9000
"""The guest's UDP echo port (``vnetprobe udp-echo``)."""
PROBE_TCP_PORT: Final = 5001
"""The guest's TCP sink port (``vnetprobe tcp-sink``)."""

_FIXED_MTIME: Final = 946684800
_GCC_TIMEOUT_S: Final = 120.0
_MAC_PATTERN: Final = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_command_ids = itertools.count(1)


def kernel_release(kernel: Path) -> str:
    """``/boot/vmlinuz-6.1.0-9-cloud-amd64`` -> ``6.1.0-9-cloud-amd64``."""
    name = kernel.name
    if not name.startswith("vmlinuz-"):
        raise LabSetupError(f"cannot tell the release of kernel {kernel}")
    return name[len("vmlinuz-"):]


def _module_files(tools: HostTools, modules_root: Path) -> list[Path]:
    base = modules_root / kernel_release(tools.kernel)
    paths = [base / module for module in NET_MODULES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LabSetupError(f"virtio-net modules missing for the guest kernel: {', '.join(missing)}"
                            " (package linux-image-cloud-amd64)")
    return paths


def _compile_probe(out: Path) -> None:
    source = importlib.resources.files("tmdht.lab").joinpath("vnetprobe.c")
    gcc = find_program("gcc")
    with tempfile.TemporaryDirectory(prefix="tmdht-vnetprobe-") as tmp:
        src = Path(tmp) / "vnetprobe.c"
        src.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
        try:
            done = subprocess.run([str(gcc), "-static", "-O2", "-s", "-o", str(out), str(src)],
                                  capture_output=True, timeout=_GCC_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LabSetupError(f"cannot run gcc: {exc}") from exc
    if done.returncode != 0:
        raise LabSetupError("gcc -static failed for vnetprobe (packages gcc, libc6-dev): "
                            f"{done.stderr.decode(errors='replace').strip()[-800:]}")


def build_net_initramfs(tools: HostTools, *, modules_root: Path = Path("/lib/modules")) -> bytes:
    """The net guests' initramfs (gzip'd newc cpio): busybox, ``netinit.sh`` as ``/init``, the
    virtio-net modules of ``tools.kernel`` under ``/lib/modules`` and ``/bin/vnetprobe``."""
    modules = _module_files(tools, modules_root)
    cpio = tools.cpio
    with tempfile.TemporaryDirectory(prefix="tmdht-netinitramfs-") as staging_name:
        staging = Path(staging_name)
        for directory in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
            (staging / directory).mkdir(mode=0o755)
        init = importlib.resources.files("tmdht.lab").joinpath("netinit.sh")
        (staging / "init").write_text(init.read_text(encoding="utf-8"), encoding="utf-8")
        shutil.copyfile(tools.busybox, staging / "bin" / "busybox")
        _compile_probe(staging / "bin" / "vnetprobe")
        for module in modules:
            shutil.copyfile(module, staging / "lib" / "modules" / module.name)
        members = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
        for member in members:
            path = staging / member
            path.chmod(0o755 if path.is_dir() or member in ("init", "bin/busybox",
                                                           "bin/vnetprobe") else 0o644)
            os.utime(path, (_FIXED_MTIME, _FIXED_MTIME))
        archive = pack_cpio(staging, [".", *members], cpio)
    return gzip.compress(archive, compresslevel=6, mtime=0)


def ensure_net_initramfs(directory: Path, tools: HostTools) -> Path:
    """Write the net initramfs to ``directory/netinitramfs-<sha256 prefix>.cpio.gz`` (atomic)."""
    data = build_net_initramfs(tools)
    path = directory / f"netinitramfs-{hashlib.sha256(data).hexdigest()[:16]}.cpio.gz"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".netinitramfs-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True, slots=True)
class NetGuestSpec(GuestSpec):
    """A net guest: a lab guest spec plus its IPv4 interface address (``10.77.0.2/24``)."""

    ip: str = "10.77.0.2/24"
    """Address and prefix of the guest's eth0."""

    def __post_init__(self) -> None:
        GuestSpec.__post_init__(self)
        try:
            ipaddress.IPv4Interface(self.ip)
        except ValueError:
            raise UsageError(f"bad guest address {self.ip!r} (want e.g. 10.77.0.2/24)") from None

    @property
    def address(self) -> str:
        """The guest's IPv4 address without the prefix."""
        return str(ipaddress.IPv4Interface(self.ip).ip)

    def kernel_cmdline(self) -> str:
        """The lab's command line plus ``tmdht.ip=`` and ``no_timer_check`` (on a loaded host
        TCG is too slow for the kernel's early IO-APIC timer check, which then panics)."""
        return f"{GuestSpec.kernel_cmdline(self)} no_timer_check tmdht.ip={self.ip}"


def _check_mac(mac: str) -> str:
    if _MAC_PATTERN.fullmatch(mac) is None:
        raise UsageError(f"bad MAC address {mac!r} (want 52:54:00:xx:xx:xx)")
    return mac


def stream_nic_args(mac: str, net_socket: Path, qmp_socket: Path | None = None) -> list[str]:
    """QEMU options of a virtio NIC on a ``-netdev stream`` unix socket QEMU listens on (a vnet
    agent connects to it), and optionally a second QMP monitor for the agent."""
    for path in (net_socket, qmp_socket):
        if path is not None and "," in str(path):
            raise UsageError(f"socket path {path} contains a comma (QEMU option syntax)")
    args = ["-netdev", f"stream,id=vnet0,server=on,addr.type=unix,addr.path={net_socket}",
            "-device", f"virtio-net-pci,id=nic0,netdev=vnet0,mac={_check_mac(mac)},romfile="]
    if qmp_socket is not None:
        args += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    return args


def tap_nic_args(mac: str, ifname: str) -> list[str]:
    """QEMU options of a virtio NIC on an existing tap device (a Linux bridge's port)."""
    return ["-netdev", f"tap,id=vnet0,ifname={ifname},script=no,downscript=no",
            "-device", f"virtio-net-pci,id=nic0,netdev=vnet0,mac={_check_mac(mac)},romfile="]


def run_in_guest(guest: Guest, command: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run a shell command in a net guest through its console; returns (status, output).

    Counter lines printed meanwhile are left out of the output.
    """
    if "\n" in command:
        raise UsageError("one line per command")
    ident = f"c{os.getpid()}x{next(_command_ids)}"
    console = guest.console
    console.send_line(f"tmdht-run {ident} {command}")
    done = re.compile(rf"tmdht-done {ident} (\d+)")
    deadline = time.monotonic() + timeout
    for _slice in range(1 << 20):
        console.pump(0.0)
        text = console.transcript
        found = done.search(text)
        if found is not None:
            begin = text.rfind(f"tmdht-begin {ident}", 0, found.start())
            body = text[begin:found.start()] if begin >= 0 else ""
            lines = body.replace("\r", "").splitlines()[1:]
            output = [line for line in lines if not line.startswith("tmdht-counter")]
            return int(found.group(1)), "\n".join(output)
        if console.eof or guest.returncode is not None:
            raise GuestError(f"guest {guest.spec.name} stopped while running {command!r}:\n"
                             f"{guest.describe_failure()}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        console.pump(min(remaining, 0.5))
    raise GuestTimeoutError(f"guest {guest.spec.name}: {command!r} not done within {timeout} s")
