"""The two Debian 12 bases the deploy test runs on, made by debootstrap and cached between runs
(keyed by everything they are made from, so a changed recipe, lock or CA bundle makes new ones).

- The Docker base: a minimal bookworm with Python 3.11, imported as an image that stands in for
  ``python:3.11-slim-bookworm`` (no registry but Debian's and PyPI's is reachable here).
- The systemd base: bookworm with systemd and the project's runtime dependencies installed from
  requirements/runtime.txt into /opt/tmdht, as deploy/README.md installs them; each run copies it
  and installs the project itself.

Both trust the host's certificate authorities (its bundle is copied in), as an image built
behind a TLS-inspecting proxy must.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from deploy_engines.host import run

__all__ = ["BASE_IMAGE", "CA_BUNDLE", "SUITE", "Bases"]

SUITE = "bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_IMAGE = "tmdht-deploy/python:3.11-bookworm"
RECIPE_VERSION = 1
DOCKER_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
# What the slim images leave out: package caches and lists, documentation, translations.
SLIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
        "usr/share/locale", "usr/share/info")  # fmt: skip
IMAGE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    f"ENV PIP_CERT={CA_BUNDLE}",
    'CMD ["python3"]',
)
NSPAWN_ONE_SHOT = ("systemd-nspawn", "--quiet", "--register=no", "--keep-unit")


class Bases:
    """The cached bases under ``cache`` (made on first use), for the repository at ``repo``."""

    def __init__(self, cache: Path, repo: Path, log: Path) -> None:
        self.cache = cache
        self.repo = repo
        self.log = log
        self.cache.mkdir(parents=True, exist_ok=True)

    def _key(self, kind: str, packages: tuple[str, ...], *files: Path) -> str:
        digest = hashlib.sha256(
            json.dumps([RECIPE_VERSION, kind, SUITE, packages, SLIM, IMAGE_CHANGES]).encode()
        )
        for path in (CA_BUNDLE, *files):
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    @property
    def docker_tar(self) -> Path:
        """The Docker base as a tar (``docker import`` input)."""
        return self.cache / f"docker-base-{self._key('docker', DOCKER_PACKAGES)}.tar"

    @property
    def systemd_root(self) -> Path:
        """The systemd base as a directory tree (copied per run)."""
        runtime = self.repo / "requirements" / "runtime.txt"
        return self.cache / f"systemd-base-{self._key('systemd', SYSTEMD_PACKAGES, runtime)}"

    def _debootstrap(self, target: Path, packages: tuple[str, ...]) -> None:
        if target.exists():
            shutil.rmtree(target)
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
                target]  # fmt: skip
        try:
            run(argv, timeout=900, log=self.log)
        except RuntimeError:  # a mirror hiccup: once more from scratch
            shutil.rmtree(target, ignore_errors=True)
            run(argv, timeout=900, log=self.log)
        shutil.copyfile(CA_BUNDLE, target / CA_BUNDLE.relative_to("/"))

    def _slim(self, root: Path) -> None:
        for relative in SLIM:
            directory = root / relative
            if directory.is_dir():
                for child in directory.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()

    def _prune(self, prefix: str, keep: Path) -> None:
        """Drop bases of older recipes (the cache holds one of each kind)."""
        for old in self.cache.glob(f"{prefix}*"):
            if old != keep:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)

    def ensure_docker(self) -> tuple[Path, str]:
        """The Docker base tar, made if missing; and how it was had."""
        tar = self.docker_tar
        if tar.exists():
            return tar, "docker base cached"
        started = time.monotonic()
        root = self.cache / "work-docker-root"
        self._debootstrap(root, DOCKER_PACKAGES)
        self._slim(root)
        partial = tar.with_suffix(".partial")
        run(["tar", "-C", root, "--numeric-owner", "-cf", partial, "."], timeout=600, log=self.log)
        shutil.rmtree(root)
        partial.rename(tar)
        self._prune("docker-base-", tar)
        return tar, f"docker base made in {time.monotonic() - started:.0f} s"

    def ensure_systemd(self) -> tuple[Path, str]:
        """The systemd base directory, made if missing; and how it was had."""
        root = self.systemd_root
        if (root / ".complete").exists():
            return root, "systemd base cached"
        started = time.monotonic()
        work = self.cache / "work-systemd-root"
        self._debootstrap(work, SYSTEMD_PACKAGES)
        requirements = self.repo / "requirements"
        install = ("python3 -m venv /opt/tmdht && /opt/tmdht/bin/pip install -q "
                   "--require-hashes -r /mnt/requirements/runtime.txt")  # fmt: skip
        run([*NSPAWN_ONE_SHOT, "--resolv-conf=copy-host", f"--bind-ro={requirements}:/mnt/requirements",
             "-D", work, "/bin/sh", "-c", install], timeout=900, log=self.log)  # fmt: skip
        self._slim(work)
        (work / ".complete").write_text("made by tests/deploy_engines/bases.py\n")
        if root.exists():
            shutil.rmtree(root)
        work.rename(root)
        self._prune("systemd-base-", root)
        return root, f"systemd base made in {time.monotonic() - started:.0f} s"
