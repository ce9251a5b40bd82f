"""The Docker half of the deploy test: Debian's dockerd (20.10, the classic builder) with private
roots, the shipped Dockerfile built on a debootstrapped base, three containers run with the
StatefulSet's pod settings, the shipped compose.yaml brought up, Debian's Prometheus scraping it.

dockerd runs with its data under the work directory, its runtime files under
/run/tmdht-deploy, no default bridge, no iptables/nft rules and ``ip_forward`` untouched: the
containers need only their own bridge (host <-> containers, containers <-> each other), and the
image build uses the host's network to reach PyPI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy_engines.bases import BASE_IMAGE, IMAGE_CHANGES
from deploy_engines.cluster import (
    cluster_status,
    make_pages,
    metric_samples,
    publish,
    readyz,
    resolve,
)
from deploy_engines.host import RUN_DIR, Daemon, run, wait_for
from deploy_engines.report import CheckFailed, Report

__all__ = ["DockerPhase"]

DOCKER = "/usr/bin/docker"  # Debian's docker.io CLI (20.10): builds with the classic builder
NETWORK = "tmdht-deploy"
BRIDGE = "tmdht-deploy0"
PROJECT = "tmdht-deploy"
IMAGE = "tmdht:0.1.0"
ADDRESS_POOL = "base=172.29.0.0/16,size=24"
TRIO = 3
READY_WITHIN = 35.0
PAGES = 2000
SOCKET_BUFFER_ASKED = 16 << 20
OPEN_FILES_WANTED = 65536


@dataclass(frozen=True)
class PodSettings:
    """What the StatefulSet's pod template asks of the container runtime."""

    user: int
    group: int
    fs_group: int
    read_only_root: bool
    drop_capabilities: list[str]
    no_new_privileges: bool
    memory_limit: str
    args: list[str]
    env: dict[str, str]
    advertise_from_pod_ip: str
    mounts: dict[str, str]  # volume name -> mount path
    tmp_size: str
    secret_mode: int
    config_toml: str
    grace_seconds: int


def pod_settings(kubernetes: Path) -> PodSettings:
    """Read deploy/kubernetes's StatefulSet and ConfigMap."""
    (statefulset,) = [
        d for d in yaml.safe_load_all((kubernetes / "statefulset.yaml").read_text()) if d
    ]
    (configmap,) = [d for d in yaml.safe_load_all((kubernetes / "configmap.yaml").read_text()) if d]
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    env, from_pod_ip = {}, ""
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP":
            from_pod_ip = item["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return PodSettings(
        user=pod["securityContext"]["runAsUser"],
        group=pod["securityContext"]["runAsGroup"],
        fs_group=pod["securityContext"]["fsGroup"],
        read_only_root=security["readOnlyRootFilesystem"],
        drop_capabilities=security["capabilities"]["drop"],
        no_new_privileges=not security["allowPrivilegeEscalation"],
        memory_limit=container["resources"]["limits"]["memory"],
        args=container["args"],
        env=env,
        advertise_from_pod_ip=from_pod_ip,
        mounts={m["name"]: m["mountPath"] for m in container["volumeMounts"]},
        tmp_size=volumes["tmp"]["emptyDir"]["sizeLimit"],
        secret_mode=volumes["cluster-key"]["secret"]["defaultMode"],
        config_toml=configmap["data"]["node.toml"],
        grace_seconds=pod["terminationGracePeriodSeconds"],
    )


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise CheckFailed(f"no open files limit in /proc/{pid}/limits")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DockerPhase:
    """Everything the Docker half starts, and its checks."""

    def __init__(self, repo: Path, work: Path, report: Report) -> None:
        self.repo = repo
        self.work = work / "docker"
        self.logs = work / "logs"
        self.report = report
        self.socket = RUN_DIR / "docker.sock"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.work / "home"),
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.work / "config"),
            "DOCKER_BUILDKIT": "0",
        }
        self.dockerd: Daemon | None = None
        self.prometheus: Daemon | None = None
        self.compose_key: Path | None = None
        self.pod = pod_settings(repo / "deploy" / "kubernetes")
        self.key_text = os.urandom(32).hex() + "\n"

    # -- plumbing ------------------------------------------------------------------------------

    def docker(self, *args: str | Path, timeout: float = 120, check: bool = True) -> str:
        """Run the docker CLI against our dockerd; its stdout."""
        proc = run([DOCKER, *args], timeout=timeout, check=check, env=self.env,
                   log=self.logs / "docker-cli.log")  # fmt: skip
        return proc.stdout

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        """docker-compose (1.29, Debian's) with the shipped compose.yaml, unmodified."""
        compose_file = self.repo / "deploy" / "container" / "compose.yaml"
        proc = run(["docker-compose", "--ansi", "never", "-p", PROJECT, "-f", compose_file, *args],
                   timeout=timeout, check=check, env=self.env,
                   log=self.logs / "docker-compose.log")  # fmt: skip
        return proc.stdout

    def inspect(self, name: str) -> dict[str, Any]:
        """``docker inspect`` of one container."""
        (doc,) = json.loads(self.docker("inspect", name))
        return dict(doc)

    def logs_of(self, name: str) -> str:
        """A container's output (the node logs on stderr)."""
        proc = run([DOCKER, "logs", name], env=self.env, timeout=60)
        return proc.stdout + proc.stderr

    def ip_of(self, name: str) -> str:
        """A container's address on its (one) network."""
        (network,) = self.inspect(name)["NetworkSettings"]["Networks"].values()
        return str(network["IPAddress"])

    # -- steps ---------------------------------------------------------------------------------

    def start_dockerd(self) -> None:
        """dockerd with private roots and no host firewall or forwarding changes."""
        for directory in (self.work / "data", self.work / "config", self.work / "home"):
            directory.mkdir(parents=True, exist_ok=True)
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        config = self.work / "daemon.json"
        # The trust key would otherwise land in /etc/docker/key.json.
        config.write_text(json.dumps({"deprecated-key-path": str(self.work / "key.json")}))
        self.dockerd = Daemon.start(
            "dockerd",
            ["dockerd", "--config-file", config, "--data-root", self.work / "data",
             "--exec-root", RUN_DIR / "exec", "--host", f"unix://{self.socket}",
             "--pidfile", RUN_DIR / "docker.pid", "--bridge", "none", "--iptables=false",
             "--ip-forward=false", "--ip-masq=false", "--userland-proxy=false",
             "--default-address-pool", ADDRESS_POOL],
            self.logs / "dockerd.log",
        )  # fmt: skip

        def answers() -> str | None:
            if not self.dockerd or not self.dockerd.running():
                raise CheckFailed(f"dockerd exited:\n{self.dockerd.tail() if self.dockerd else ''}")
            proc = run([DOCKER, "version", "-f", "{{.Server.Version}}"], check=False, env=self.env)
            return proc.stdout.strip() if proc.returncode == 0 else None

        version = wait_for("dockerd answering", answers, 60)
        self.report.say(f"dockerd {version} (pid {self.dockerd.pid}) on {self.socket}")

    def import_base(self, tar: Path) -> str:
        """The debootstrapped base as the image the Dockerfile's PYTHON_IMAGE names."""
        changes = [arg for change in IMAGE_CHANGES for arg in ("--change", change)]
        self.docker("import", *changes, tar, BASE_IMAGE, timeout=300)
        size = int(self.docker("image", "inspect", "-f", "{{.Size}}", BASE_IMAGE).strip())
        return f"{BASE_IMAGE}, {size / 1e6:.0f} MB"

    def check_context(self) -> str:
        """What the classic builder sends: only what .dockerignore lets through."""
        lister = f"FROM {BASE_IMAGE}\nCOPY . /context\nRUN cd /context && find . -type f | sort\n"
        proc = run([DOCKER, "build", "--network", "host", "--no-cache", "--rm", "-f", "-", "."],
                   timeout=300, env=self.env, input_text=lister, log=self.logs / "docker-cli.log",
                   cwd=self.repo)  # fmt: skip
        sent = re.search(r"Sending build context to Docker daemon\s+([\d.]+)([kMG]?B)", proc.stdout)
        if sent is None:
            raise CheckFailed("no 'Sending build context' line: not the classic builder?")
        files = [line[2:] for line in proc.stdout.splitlines() if line.startswith("./")]
        for line in self.docker("images", "-q", "--filter", "dangling=true").split():
            self.docker("rmi", line, check=False)
        leaked = [
            f for f in files
            if f.split("/")[0] in {".git", "build", "tests", "bench"} or f.endswith(".so")
        ]  # fmt: skip
        if leaked or not any(f.startswith("node/") for f in files):
            raise CheckFailed(f"context holds {leaked[:5]} ... or lacks node/: {files[:10]}")
        size = float(sent.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[sent.group(2)]
        if size > 5e6:
            raise CheckFailed(f"context of {size / 1e6:.1f} MB: .dockerignore not honoured")
        return f"{len(files)} files, {size / 1e3:.0f} kB (no .git, no build/)"

    def build_image(self) -> str:
        """docker build of the shipped Dockerfile, as deploy/README.md says, on our base."""
        proc = run([DOCKER, "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
                    "-f", "deploy/container/Dockerfile", "-t", IMAGE, "."],
                   timeout=900, env=self.env, log=self.logs / "docker-build.log",
                   cwd=self.repo)  # fmt: skip
        if f"Successfully tagged {IMAGE}" not in proc.stdout:
            raise CheckFailed("docker build did not tag the image")
        listing = self.docker("run", "--rm", "--entrypoint", "/opt/tmdht/bin/pip", IMAGE, "list",
                              "--format", "json", "--disable-pip-version-check")  # fmt: skip
        installed = json.loads(listing)
        pins = _pins(self.repo / "requirements" / "runtime.txt")
        got = {_canonical(p["name"]): p["version"] for p in installed}
        wrong = {n: (v, got.get(n)) for n, v in pins.items() if got.get(n) != v}
        if wrong:
            raise CheckFailed(f"image packages differ from requirements/runtime.txt: {wrong}")
        size = int(self.docker("image", "inspect", "-f", "{{.Size}}", IMAGE).strip())
        return f"{IMAGE}, {size / 1e6:.0f} MB, {len(pins)} packages as locked"

    def _write_pod_files(self) -> tuple[Path, Path]:
        """The ConfigMap and the Secret as the kubelet would mount them."""
        config = self.work / "k8s" / "config"
        secret = self.work / "k8s" / "secret"
        config.mkdir(parents=True, exist_ok=True)
        secret.mkdir(parents=True, exist_ok=True)
        (config / "node.toml").write_text(self.pod.config_toml)
        key = secret / "cluster.key"
        key.write_text(self.key_text)
        os.chown(key, 0, self.pod.fs_group)
        key.chmod(self.pod.secret_mode)
        return config, secret

    def run_trio(self) -> list[str]:
        """Three containers on a private bridge, with the StatefulSet's pod settings."""
        config, secret = self._write_pod_files()
        # Static addresses (the advertised "pod IP" is known before the node starts) need a
        # subnet of the user's: take the one dockerd picks from its pool.
        self.docker("network", "create", NETWORK)
        (network,) = json.loads(self.docker("network", "inspect", NETWORK))
        (ipam,) = network["IPAM"]["Config"]
        self.docker("network", "rm", NETWORK)
        self.docker("network", "create", "--driver", "bridge", "--subnet", ipam["Subnet"],
                    "--gateway", ipam["Gateway"], "-o", f"com.docker.network.bridge.name={BRIDGE}",
                    NETWORK)  # fmt: skip
        prefix = ipam["Subnet"].rsplit(".", 1)[0]
        pod = self.pod
        names = []
        for index in range(TRIO):
            name, ip = f"tmdht-deploy-{index}", f"{prefix}.{11 + index}"
            env = {**pod.env, pod.advertise_from_pod_ip: ip}
            self.docker(
                "run", "--detach", "--name", name, "--hostname", f"tmdht-{index}",
                "--network", NETWORK, "--ip", ip, "--network-alias", f"tmdht-{index}.tmdht-nodes",
                "--user", f"{pod.user}:{pod.group}", "--group-add", str(pod.fs_group),
                *(["--read-only"] if pod.read_only_root else []),
                *(a for c in pod.drop_capabilities for a in ("--cap-drop", c)),
                *(["--security-opt", "no-new-privileges"] if pod.no_new_privileges else []),
                "--memory", pod.memory_limit.replace("Gi", "g").replace("Mi", "m"),
                "--tmpfs", f"{pod.mounts['tmp']}:size={pod.tmp_size.replace('Mi', 'm')},mode=1777",
                "--volume", f"{name}-data:{pod.mounts['data']}",
                "--volume", f"{config}:{pod.mounts['config']}:ro",
                "--volume", f"{secret}:{pod.mounts['cluster-key']}:ro",
                "--stop-timeout", str(pod.grace_seconds),
                *(a for k, v in env.items() for a in ("--env", f"{k}={v}")),
                IMAGE, *pod.args,
            )  # fmt: skip
            names.append(name)
        return names

    def wait_ready(self, names: list[str], within: float) -> dict[str, dict[str, Any]]:
        """Each container's /readyz document once all answer 200."""
        port = 7402
        addresses = {n: self.ip_of(n) for n in names}

        def all_ready() -> dict[str, dict[str, Any]] | None:
            docs = {n: readyz(ip, port) for n, ip in addresses.items()}
            for name in names:
                if self.inspect(name)["State"]["Status"] != "running":
                    tail = "\n".join(self.logs_of(name).splitlines()[-20:])
                    raise CheckFailed(f"{name} is not running:\n{tail}")
            return docs if all(docs.values()) else None  # type: ignore[return-value]

        return wait_for("every node ready", all_ready, within)

    def check_hardening(self, names: list[str]) -> str:
        """The settings really applied, as the kernel sees the node process."""
        for name in names:
            doc = self.inspect(name)
            host = doc["HostConfig"]
            if not (host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"]):
                raise CheckFailed(f"{name}: read-only {host['ReadonlyRootfs']}, {host['CapDrop']}")
            status = _status_fields(doc["State"]["Pid"])
            uids = set(status["Uid"].split())
            if uids != {str(self.pod.user)} or str(self.pod.fs_group) not in status["Groups"]:
                raise CheckFailed(f"{name}: Uid {status['Uid']}, Groups {status['Groups']}")
            if int(status["CapEff"], 16) or status["NoNewPrivs"] != "1" or status["Seccomp"] != "2":
                raise CheckFailed(f"{name}: CapEff {status['CapEff']}, NoNewPrivs "
                                  f"{status['NoNewPrivs']}, Seccomp {status['Seccomp']}")  # fmt: skip
        return f"uid {self.pod.user}, read-only root, no capabilities, no_new_privs, seccomp filter"

    def status(self, seed_ip: str, key_file: Path) -> list[dict[str, Any]]:
        """cluster status --json once it lists the trio, all ready."""

        def three_ready() -> list[dict[str, Any]] | None:
            members = cluster_status(f"{seed_ip}:7400", key_file)
            ready = [m for m in members if m["health"] == "ready"]
            return members if len(members) == TRIO and len(ready) == TRIO else None

        return wait_for("3 ready members in cluster status", three_ready, 30, interval=1.0)

    def publish_and_resolve(self, seed_ip: str) -> tuple[list[tuple[bytes, bytes]], str]:
        """Pages stored through the cluster and read back, from the host."""
        pages = make_pages(PAGES, tag=1)
        copies = publish((seed_ip, 7400), self.key_text, pages)
        resolve((seed_ip, 7400), self.key_text, pages)
        return pages, f"{PAGES} pages, {copies} copies stored, all resolved byte for byte"

    def restart_keeps_identity(
        self, name: str, seed_ip: str, pages: list[tuple[bytes, bytes]]
    ) -> str:
        """docker stop (SIGTERM: drain, close LMDB) and start: same node id, same pages."""
        ip = self.ip_of(name)
        before = readyz(ip, 7402)
        if before is None:
            raise CheckFailed(f"{name} not ready before the restart")
        self.docker("stop", name, timeout=60)
        code = self.inspect(name)["State"]["ExitCode"]
        if code != 0:
            raise CheckFailed(f"{name} exited {code} on SIGTERM (no graceful drain)")
        self.docker("start", name)
        after = self.wait_ready([name], READY_WITHIN)[name]
        if (after["node_id"], after["pages"]) != (before["node_id"], before["pages"]):
            raise CheckFailed(f"before {before}, after {after}")
        resolve((seed_ip, 7400), self.key_text, pages)
        return f"{name}: id {after['node_id'][:16]}, {after['pages']} pages kept; exit 0 on stop"

    def check_logs(self, names: list[str]) -> str:
        """What a node logs in a container here: the limits it could not get, said once."""
        notes = []
        rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
        for name in names:
            logs = self.logs_of(name)
            soft, hard = _open_files_limits(self.inspect(name)["State"]["Pid"])
            if hard < OPEN_FILES_WANTED:
                if soft != hard or f"open files limit is {hard} (hard limit {hard})" not in logs:
                    raise CheckFailed(f"{name}: open files {soft}/{hard}, no warning logged")
            elif soft < OPEN_FILES_WANTED:
                raise CheckFailed(f"{name}: soft open files {soft} not raised")
            samples = metric_samples(self.ip_of(name), 7402)
            granted = samples[
                ("tmdht_socket_buffer_bytes", (("direction", "receive"), ("socket", "data")))
            ]
            asked = samples[
                (
                    "tmdht_socket_buffer_requested_bytes",
                    (("direction", "receive"), ("socket", "data")),
                )
            ]
            warned = "socket buffers smaller than asked" in logs
            if (rmem_max < SOCKET_BUFFER_ASKED) != warned or (granted < asked) != warned:
                raise CheckFailed(f"{name}: rmem_max {rmem_max}, data socket {granted}/{asked} "
                                  f"granted, warned: {warned}")  # fmt: skip
        notes.append(f"open files {soft}/{hard} (wanted {OPEN_FILES_WANTED})"
                     + (": warned, started" if hard < OPEN_FILES_WANTED else ""))  # fmt: skip
        notes.append(f"data socket buffer {granted:.0f} of {asked:.0f} granted"
                     + (": warned, metric shows it" if granted < asked else ""))  # fmt: skip
        return "; ".join(notes)

    def check_quiet_sweeps(self, names: list[str], window: int = 4) -> str:
        """Sweeps that move nothing (every 2 s with the ConfigMap's settings) stay out of the
        info log: over ``window`` more sweeps of a cluster at rest each node logs at most one
        line (a late membership change); it logged one per sweep before."""

        def sweeps() -> list[int]:
            return [
                int(metric_samples(self.ip_of(n), 7402)[("tmdht_replication_sweeps_total", ())])
                for n in names
            ]

        def lines() -> list[int]:
            return [self.logs_of(name).count("replication sweep:") for name in names]

        start, lines_before = sweeps(), lines()
        wait_for(
            f"{window} more sweeps on every node",
            lambda: all(now >= then + window for now, then in zip(sweeps(), start, strict=True)),
            60,
            interval=1.0,
        )
        new = [after - before for after, before in zip(lines(), lines_before, strict=True)]
        if max(new) > 1:
            raise CheckFailed(f"{new} info lines in {window} sweeps at rest (before: one each)")
        return f"{max(new)} info lines in {window} sweeps at rest per node ({max(lines_before)} before)"

    def remove_trio(self, names: list[str]) -> None:
        """The containers, their volumes and the network."""
        self.docker("rm", "--force", "--volumes", *names, check=False)
        self.docker("volume", "rm", *(f"{n}-data" for n in names), check=False)
        self.docker("network", "rm", NETWORK, check=False)

    def compose_up(self) -> tuple[list[str], Path]:
        """The shipped compose.yaml's three nodes (the monitoring images come from Docker Hub,
        which is not reachable here; Debian's Prometheus stands in below)."""
        key = self.repo / "deploy" / "container" / "cluster.key"
        if key.exists():
            raise CheckFailed(
                f"{key} exists: move it away (the test writes its own and removes it)"
            )
        self.compose_key = key
        key.write_text(self.key_text)
        os.chown(key, 10001, 10001)  # compose hands file secrets over with owner and mode
        key.chmod(0o400)
        self.compose("up", "--detach", "--no-build", "node1", "node2", "node3")
        ids = self.compose("ps", "-q").split()
        names = [self.inspect(i)["Name"].lstrip("/") for i in ids]
        if len(names) != TRIO:
            raise CheckFailed(f"compose runs {names}")
        return sorted(names), key

    def prometheus_quiet(self, names: list[str]) -> str:
        """Debian's prometheus with the shipped config and rules (faster intervals), scraping the
        compose nodes: every target up, every rule evaluated without error, no alert pending."""
        source = self.repo / "deploy" / "prometheus"
        target = self.work / "prometheus"
        shutil.copytree(source, target, dirs_exist_ok=True)
        port = _free_port()
        config = yaml.safe_load((source / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="2s", evaluation_interval="2s", scrape_timeout="1s")
        for job in config["scrape_configs"]:
            if job["job_name"] == "prometheus":
                job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        (target / "prometheus.yml").write_text(yaml.safe_dump(config))
        (groups,) = [yaml.safe_load((source / "targets" / "nodes.yml").read_text())]
        groups[0]["targets"] = [f"{self.ip_of(n)}:7402" for n in names]
        (target / "targets" / "nodes.yml").write_text(yaml.safe_dump(groups))
        self.prometheus = Daemon.start(
            "prometheus",
            ["prometheus", "--config.file", target / "prometheus.yml",
             "--storage.tsdb.path", self.work / "prometheus-data",
             "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warn"],
            self.logs / "prometheus.log",
        )  # fmt: skip
        api = f"http://127.0.0.1:{port}/api/v1"

        def get(path: str) -> Any:
            with urllib.request.urlopen(api + path, timeout=5) as response:
                return json.loads(response.read())["data"]

        def nodes_up() -> list[dict[str, Any]] | None:
            targets = [t for t in get("/targets")["activeTargets"]
                       if t["labels"]["job"] == "tmdht-nodes"]  # fmt: skip
            return (
                targets
                if len(targets) == TRIO and all(t["health"] == "up" for t in targets)
                else None
            )

        wait_for("prometheus scraping every node", nodes_up, 40, interval=1.0)
        rounds = 0

        def rules_evaluated_quietly() -> bool:
            nonlocal rounds
            alerts = get("/alerts")["alerts"]
            if alerts:
                raise CheckFailed(
                    f"alerts: {[(a['labels']['alertname'], a['state']) for a in alerts]}"
                )
            rules = [r for g in get("/rules")["groups"] for r in g["rules"]]
            bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] not in ("ok",)]
            if bad and rounds > 2:
                raise CheckFailed(f"rules not evaluated cleanly: {bad}")
            rounds += 1
            return rounds >= 6 and not bad  # about six evaluation intervals, all quiet

        wait_for("six quiet rule evaluations", rules_evaluated_quietly, 40, interval=2.0)
        ready = get("/query?query=sum(tmdht_ready%7Bjob%3D%22tmdht-nodes%22%7D)")["result"]
        total = float(ready[0]["value"][1]) if ready else 0.0
        if total != TRIO:
            raise CheckFailed(f"sum(tmdht_ready) = {total}")
        rules = sum(len(g["rules"]) for g in get("/rules")["groups"])
        return f"3 targets up, sum(tmdht_ready) = 3, {rules} rules evaluated, no alert pending or firing"

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Stop and remove everything; what was left over before stopping dockerd."""
        leftovers: list[str] = []
        if self.prometheus is not None:
            self.prometheus.stop(30)
        if self.dockerd is not None and self.dockerd.running():
            if self.compose_key is not None:
                self.compose("down", "--volumes", "--remove-orphans", check=False, timeout=120)
            ids = self.docker("ps", "--all", "--quiet", check=False).split()
            if ids:
                self.docker("rm", "--force", "--volumes", *ids, check=False, timeout=120)
            for network in self.docker(
                "network", "ls", "--format", "{{.Name}}", check=False
            ).split():
                if network not in ("host", "none", "bridge"):
                    self.docker("network", "rm", network, check=False)
            volumes = self.docker("volume", "ls", "--quiet", check=False).split()
            if volumes:
                self.docker("volume", "rm", *volumes, check=False)
            leftovers += [f"container {c}" for c in self.docker("ps", "-aq", check=False).split()]
            leftovers += [f"network {n}" for n in self.docker("network", "ls", "--format", "{{.Name}}",
                                                               check=False).split()
                          if n not in ("host", "none")]  # fmt: skip
            leftovers += [
                f"volume {v}" for v in self.docker("volume", "ls", "-q", check=False).split()
            ]
        if self.dockerd is not None:
            code = self.dockerd.stop(60)
            if code not in (0, None):
                leftovers.append(f"dockerd exited {code}")
        if self.compose_key is not None:
            self.compose_key.unlink(missing_ok=True)
        return leftovers


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    return pins
