"""Captured guest memory, cached on disk: what tests, benchmarks and the demo work on.

A capture boots a :class:`~tmdht.lab.guest.Guest`, lets its workload run a few seconds, migrates it
into a file (a real QEMU migration stream, guest running while RAM is copied), then — the source
paused in ``postmigrate`` — saves its physical memory [0, RAM size) with ``pmemsave`` and
optionally an ELF core. The stream's final memory and the dump show the same guest state.

Captures live in ``build_dir/guests/<name>-<key>/`` where the key hashes everything that changes
the result (initramfs and init script, busybox, kernel, QEMU version, spec, capture settings). A
capture is made in a ``.partial-*`` directory and renamed into place as a whole, so a directory
with the final name is always complete; a half capture from an interrupted run never looks valid.

Run ``python -m tmdht.lab.capture --build-dir build`` to capture :func:`default_specs`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from tmdht.lab.errors import CaptureError, LabError, UsageError
from tmdht.lab.guest import Guest, GuestSpec, MigrationStats
from tmdht.lab.host import HostTools, file_sha256
from tmdht.lab.initramfs import ensure_initramfs, init_script

__all__ = [
    "CAPTURE_FORMAT",
    "GuestCapture",
    "capture_guests",
    "capture_key",
    "default_specs",
    "load_capture",
    "main",
]

CAPTURE_FORMAT: Final = 1
"""Version of the capture layout and procedure; bump it to invalidate every cached capture."""
DEFAULT_COUNTER_TARGET: Final = 4
"""Captures are taken once the guest printed this counter value (about 4 s of workload)."""
STREAM_FILE: Final = "stream.bin"
DUMP_FILE: Final = "memory.raw"
ELF_FILE: Final = "memory.elf"
METADATA_FILE: Final = "metadata.json"

_QEMU_MAGIC: Final = b"QEVM"
_PARTIAL_PREFIX: Final = ".partial-"
_DEFAULT_PARALLEL: Final = 2


def default_specs() -> tuple[GuestSpec, ...]:
    """The guests tests, benchmarks and the demo use: four workloads with KASLR, one without."""
    return (
        GuestSpec(name="idle-1", workload="idle", seed=1),
        GuestSpec(name="files-2", workload="files", seed=2),
        GuestSpec(name="compute-3", workload="compute", seed=3),
        GuestSpec(name="mixed-4", workload="mixed", seed=4),
        GuestSpec(name="files-nokaslr-5", workload="files", seed=5, kaslr=False),
    )


@dataclass(frozen=True, slots=True)
class GuestCapture:
    """One captured guest: its migration stream, raw memory dump and metadata."""

    name: str
    """The spec's name."""
    spec: GuestSpec
    """What the guest ran."""
    key: str
    """The cache key (hex SHA-256)."""
    directory: Path
    """``build_dir/guests/<name>-<key prefix>``."""
    stream_path: Path
    """The QEMU migration stream (starts with ``QEVM``)."""
    dump_path: Path
    """The raw dump of guest physical memory [0, ram_bytes) (``pmemsave``)."""
    elf_path: Path | None
    """The ELF core (``dump-guest-memory``, paging off), if captured."""
    ram_bytes: int
    """Guest RAM size in bytes (= dump size)."""
    metadata_path: Path
    """The JSON metadata (versions, timings, migration statistics)."""

    def metadata(self) -> dict[str, Any]:
        """Load the JSON metadata."""
        return dict(json.loads(self.metadata_path.read_text(encoding="utf-8")))


class CaptureGuest(Protocol):
    """What a capture needs from a guest (:class:`~tmdht.lab.guest.Guest` provides it)."""

    def __enter__(self) -> CaptureGuest: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def wait_counter(self, min_value: int, timeout: float) -> int: ...

    def migrate_to_file(self, path: Path, *, timeout: float = ...) -> MigrationStats: ...

    def pmemsave(self, path: Path, *, size: int | None = ..., timeout: float = ...) -> Path: ...

    def dump_elf(self, path: Path, *, timeout: float = ...) -> Path: ...


GuestFactory = Callable[..., CaptureGuest]
"""Called as ``factory(spec, tools=..., initramfs=...)``; :class:`Guest` by default."""


def capture_key(spec: GuestSpec, tools: HostTools, initramfs: Path, *, with_elf: bool,
                counter_target: int) -> tuple[str, dict[str, Any]]:
    """The cache key of a capture and the inputs it hashes."""
    inputs: dict[str, Any] = {
        "format": CAPTURE_FORMAT,
        "spec": spec.cache_inputs(),
        "init_script_sha256": hashlib.sha256(init_script().encode()).hexdigest(),
        "initramfs_sha256": file_sha256(initramfs),
        "busybox_sha256": file_sha256(tools.busybox),
        "kernel": tools.kernel.name,
        "kernel_sha256": file_sha256(tools.kernel),
        "qemu_version": tools.qemu_version(),
        "with_elf": with_elf,
        "counter_target": counter_target,
    }
    encoded = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest(), inputs


def load_capture(directory: Path) -> GuestCapture:
    """Load and check a capture directory; raises :class:`CaptureError` if it is unusable."""
    metadata_path = directory / METADATA_FILE
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
        if metadata.get("format") != CAPTURE_FORMAT:
            raise CaptureError(f"{directory}: capture format {metadata.get('format')!r}, "
                               f"expected {CAPTURE_FORMAT}")
        spec = GuestSpec(**metadata["spec"])
        files = metadata["files"]
        sizes = metadata["sizes"]
        ram_bytes = int(metadata["ram_bytes"])
        capture = GuestCapture(
            name=spec.name, spec=spec, key=str(metadata["key"]), directory=directory,
            stream_path=directory / files["stream"], dump_path=directory / files["dump"],
            elf_path=directory / files["elf"] if files.get("elf") else None,
            ram_bytes=ram_bytes, metadata_path=metadata_path)
    except (OSError, ValueError, KeyError, TypeError, UsageError) as exc:
        raise CaptureError(f"{directory}: unusable capture metadata ({exc})") from exc
    _check_files(capture, sizes)
    return capture


def _check_files(capture: GuestCapture, sizes: dict[str, int] | None = None) -> None:
    """Check the files exist (with the recorded sizes), the stream's magic and the dump size."""
    paths = {"stream": capture.stream_path, "dump": capture.dump_path}
    if capture.elf_path is not None:
        paths["elf"] = capture.elf_path
    for role, path in paths.items():
        if not path.is_file():
            raise CaptureError(f"{capture.directory}: {role} file {path.name} is missing")
        if sizes is not None and path.stat().st_size != sizes.get(role):
            raise CaptureError(f"{capture.directory}: {role} file {path.name} has "
                               f"{path.stat().st_size} bytes, metadata says {sizes.get(role)}")
    with capture.stream_path.open("rb") as stream:
        if stream.read(4) != _QEMU_MAGIC:
            raise CaptureError(f"{capture.stream_path} is not a QEMU migration stream")
    if capture.dump_path.stat().st_size != capture.ram_bytes:
        raise CaptureError(f"{capture.dump_path} has {capture.dump_path.stat().st_size} bytes, "
                           f"expected {capture.ram_bytes}")


def _capture_one(spec: GuestSpec, final_dir: Path, key: str, inputs: dict[str, Any],
                 tools: HostTools, initramfs: Path, *, with_elf: bool, counter_target: int,
                 boot_timeout: float, guest_factory: GuestFactory) -> GuestCapture:
    """Boot, run, migrate to file, dump; then move the finished directory into place."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL_PREFIX}{final_dir.name}-{os.getpid()}-",
                                    dir=final_dir.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; captures are shared build products
    try:
        timings: dict[str, float] = {}
        started = time.monotonic()
        with guest_factory(spec, tools=tools, initramfs=initramfs) as guest:
            counter = guest.wait_counter(counter_target, timeout=boot_timeout)
            timings["boot_and_workload_s"] = time.monotonic() - started
            mark = time.monotonic()
            stats = guest.migrate_to_file(partial / STREAM_FILE)
            timings["migration_s"] = time.monotonic() - mark
            mark = time.monotonic()
            guest.pmemsave(partial / DUMP_FILE, size=spec.ram_bytes)
            timings["pmemsave_s"] = time.monotonic() - mark
            if with_elf:
                mark = time.monotonic()
                guest.dump_elf(partial / ELF_FILE)
                timings["elf_s"] = time.monotonic() - mark
        timings["total_s"] = time.monotonic() - started
        files = {"stream": STREAM_FILE, "dump": DUMP_FILE, "elf": ELF_FILE if with_elf else None}
        capture = GuestCapture(
            name=spec.name, spec=spec, key=key, directory=final_dir,
            stream_path=final_dir / STREAM_FILE, dump_path=final_dir / DUMP_FILE,
            elf_path=final_dir / ELF_FILE if with_elf else None, ram_bytes=spec.ram_bytes,
            metadata_path=final_dir / METADATA_FILE)
        _check_files(_relocated(capture, partial))
        sizes = {role: (partial / name).stat().st_size for role, name in files.items() if name}
        metadata = {
            "format": CAPTURE_FORMAT, "key": key, "name": spec.name, "spec": asdict(spec),
            "ram_bytes": spec.ram_bytes, "files": files, "sizes": sizes, "inputs": inputs,
            "kernel_path": str(tools.kernel), "qemu_path": str(tools.qemu),
            "counter_at_capture": counter, "timings": timings, "migration": stats.to_json(),
            "created_unix": time.time(),
        }
        (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
        try:
            partial.rename(final_dir)
        except OSError:
            # Another process finished the same capture first: keep theirs.
            if not (final_dir / METADATA_FILE).is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)
            return load_capture(final_dir)
        return capture
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _relocated(capture: GuestCapture, directory: Path) -> GuestCapture:
    """The same capture with its files looked up in ``directory`` (the partial one)."""
    return GuestCapture(
        name=capture.name, spec=capture.spec, key=capture.key, directory=directory,
        stream_path=directory / capture.stream_path.name,
        dump_path=directory / capture.dump_path.name,
        elf_path=directory / capture.elf_path.name if capture.elf_path else None,
        ram_bytes=capture.ram_bytes, metadata_path=directory / METADATA_FILE)


def _remove_stale_partials(guests_dir: Path) -> None:
    """Delete ``.partial-*`` directories left by processes that no longer exist."""
    if not guests_dir.is_dir():
        return
    for entry in guests_dir.iterdir():
        if not entry.name.startswith(_PARTIAL_PREFIX) or not entry.is_dir():
            continue
        fields = entry.name[len(_PARTIAL_PREFIX):].rsplit("-", 2)
        if len(fields) != 3 or not fields[1].isdigit():
            continue
        pid = int(fields[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue  # alive, someone else's


def capture_guests(build_dir: Path, specs: Sequence[GuestSpec], *, with_elf: bool = False,
                   counter_target: int = DEFAULT_COUNTER_TARGET,
                   parallel: int = _DEFAULT_PARALLEL, boot_timeout: float = 120.0,
                   tools: HostTools | None = None,
                   guest_factory: GuestFactory = Guest) -> list[GuestCapture]:
    """Return a capture of every spec (in order), booting guests only for missing ones.

    Up to ``parallel`` guests run at once. Raises :class:`CaptureError` if any capture fails
    (the others are still completed and cached).
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"guest names must be unique: {names}")
    if parallel < 1:
        raise UsageError(f"parallel must be >= 1, not {parallel}")
    tools = HostTools.discover() if tools is None else tools
    build_dir = Path(build_dir).resolve()
    guests_dir = build_dir / "guests"
    base_initramfs = ensure_initramfs(build_dir / "lab", tools.busybox, tools.cpio)
    server_initramfs = base_initramfs
    if any(spec.server for spec in specs):
        server_initramfs = ensure_initramfs(build_dir / "lab", tools.busybox, tools.cpio,
                                            server=True)
    _remove_stale_partials(guests_dir)

    results: dict[str, GuestCapture] = {}
    missing: list[tuple[GuestSpec, Path, str, dict[str, Any], Path]] = []
    for spec in specs:
        initramfs = server_initramfs if spec.server else base_initramfs
        key, inputs = capture_key(spec, tools, initramfs, with_elf=with_elf,
                                  counter_target=counter_target)
        final_dir = guests_dir / f"{spec.name}-{key[:16]}"
        if final_dir.exists():
            try:
                capture = load_capture(final_dir)
            except CaptureError:
                _discard(final_dir)
            else:
                if capture.key == key:
                    results[spec.name] = capture
                    continue
                _discard(final_dir)
        missing.append((spec, final_dir, key, inputs, initramfs))

    if missing:
        errors: list[tuple[str, BaseException]] = []
        with ThreadPoolExecutor(max_workers=min(parallel, len(missing)),
                                thread_name_prefix="tmdht-capture") as pool:
            futures = {
                spec.name: pool.submit(
                    _capture_one, spec, final_dir, key, inputs, tools, initramfs,
                    with_elf=with_elf, counter_target=counter_target,
                    boot_timeout=boot_timeout, guest_factory=guest_factory)
                for spec, final_dir, key, inputs, initramfs in missing}
            for name, future in futures.items():
                try:
                    results[name] = future.result()
                except (LabError, UsageError, OSError) as exc:
                    errors.append((name, exc))
        if errors:
            name, first = errors[0]
            others = f" (and {len(errors) - 1} more failed)" if len(errors) > 1 else ""
            raise CaptureError(f"capture of guest {name} failed{others}: {first}") from first
    return [results[spec.name] for spec in specs]


def _discard(directory: Path) -> None:
    """Move an unusable capture out of the way (atomically), then delete it."""
    trash = directory.with_name(f"{_PARTIAL_PREFIX}{directory.name}-{os.getpid()}-discard")
    shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Capture the default guests and print one line per guest: name, stream, dump [, elf]."""
    parser = argparse.ArgumentParser(prog="python -m tmdht.lab.capture", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", type=Path, default=Path("build"),
                        help="cache directory (default: ./build)")
    parser.add_argument("--elf", action="store_true", help="also write ELF cores")
    parser.add_argument("--parallel", type=int, default=_DEFAULT_PARALLEL,
                        help="guests booted at once (default: 2)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    args = parser.parse_args(argv)
    try:
        captures = capture_guests(args.build_dir, default_specs(), with_elf=args.elf,
                                  parallel=args.parallel)
    except (LabError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"name": c.name, "stream": str(c.stream_path),
                           "dump": str(c.dump_path),
                           "elf": str(c.elf_path) if c.elf_path else None,
                           "metadata": str(c.metadata_path), "ram_bytes": c.ram_bytes}
                          for c in captures], indent=2))
    else:
        for c in captures:
            print("\t".join([c.name, str(c.stream_path), str(c.dump_path),
                             *([str(c.elf_path)] if c.elf_path else [])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
