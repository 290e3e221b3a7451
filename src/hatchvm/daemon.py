"""hatchd, the composition root: builds every part explicitly and runs them in one loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import sys
from pathlib import Path

import structlog
import uvicorn
import uvloop

from hatchvm import __version__
from hatchvm.agent.agents import Agents
from hatchvm.api.app import create_app
from hatchvm.api.connections import guarded_protocol
from hatchvm.api.deps import Services
from hatchvm.api.metrics import metrics_app
from hatchvm.auth.base import build_verifier
from hatchvm.config import ConfigError, Settings, load_settings
from hatchvm.core.activity import Activity
from hatchvm.core.console import Consoles
from hatchvm.core.execs import ExecService
from hatchvm.core.files import FileService
from hatchvm.core.forks import ForkService
from hatchvm.core.guest import GuestService
from hatchvm.core.liveness import Liveness
from hatchvm.core.network import HostNetwork
from hatchvm.core.reconcile import reconcile
from hatchvm.core.routes import RouteService
from hatchvm.core.snapshots import SnapshotService
from hatchvm.core.templates import TemplateService
from hatchvm.core.vms import VMService
from hatchvm.core.wake import WakeService
from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.db.migrate import DatabaseUnreachable, upgrade
from hatchvm.gateway.ssh import SSHGateway
from hatchvm.images.registry import prune as prune_images
from hatchvm.images.registry import register_default
from hatchvm.logging import configure_logging
from hatchvm.metrics import Metrics
from hatchvm.metrics.listener import MetricsListener
from hatchvm.metrics.scrape import Scrape
from hatchvm.net.errors import NetworkError
from hatchvm.private import PRIVATE_UMASK, make_private_dir, tighten_tree
from hatchvm.proxy.limits import Admission, capped_by_fd_budget
from hatchvm.proxy.server import Proxy
from hatchvm.reaper import IdleReaper
from hatchvm.snapshots.errors import ArtifactError
from hatchvm.snapshots.local import LocalStore
from hatchvm.snapshots.s3 import S3Store
from hatchvm.snapshots.store import ArtifactStore
from hatchvm.vmm.accel import detect_accel
from hatchvm.vmm.accel import probe as probe_accel
from hatchvm.vmm.base import VMM, VMMError
from hatchvm.vmm.cgroups import CgroupError, VMCgroups, find_layout
from hatchvm.vmm.fc_jail import Jailer, JailError, UidRange, check_jail_base, check_uid_range
from hatchvm.vmm.firecracker import FirecrackerVMM
from hatchvm.vmm.process import become_subreaper
from hatchvm.vmm.qemu import QemuVMM

log = structlog.get_logger("hatchvm.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


async def _build_vmm(settings: Settings) -> tuple[VMM, str]:
    """The VMM driver and the acceleration it uses. `auto` takes Firecracker only where KVM
    really runs a guest and its binary is installed, QEMU otherwise. An explicit
    HATCH_VMM=firecracker starts even where KVM is unusable (with a warning: its guests will
    not run), so the driver can be exercised against a stand-in binary."""
    make_private_dir(settings.run_dir)
    firecracker = shutil.which(settings.firecracker_bin)
    if settings.vmm == "firecracker":
        if firecracker is None:
            raise StartupError(
                f"HATCH_VMM=firecracker but {settings.firecracker_bin} is not found "
                "(set HATCH_FIRECRACKER_BIN)"
            )
        problem = await _kvm_problem(settings)
        if problem is not None:
            log.warning(
                "firecracker chosen but KVM is unusable: guests will not run", reason=problem
            )
        fc = _build_firecracker(settings, firecracker, problem is None)
        return fc, "kvm" if problem is None else "none"
    accel = await detect_accel(settings.qemu_bin, settings.qemu_accel)
    if settings.vmm == "auto" and firecracker is not None and accel == "kvm":
        log.info("kvm works and firecracker is installed: guests run on firecracker")
        return _build_firecracker(settings, firecracker, True), accel
    if settings.firecracker_jailer:
        log.warning("HATCH_FIRECRACKER_JAILER is set but guests run on QEMU: it is not used")
    qemu = QemuVMM(
        settings.qemu_bin,
        accel,
        settings.run_dir,
        settings.qemu_tb_size_mib,
        _build_cgroups(settings),
    )
    return qemu, accel


def _build_firecracker(settings: Settings, firecracker: str, kvm_usable: bool) -> FirecrackerVMM:
    cgroups = _build_cgroups(settings)
    jailer = _build_jailer(settings, firecracker, cgroups)
    return FirecrackerVMM(firecracker, settings.run_dir, kvm_usable, cgroups, jailer=jailer)


def _build_jailer(settings: Settings, firecracker: str, cgroups: VMCgroups | None) -> Jailer | None:
    """Firecracker's jailer when HATCH_FIRECRACKER_JAILER is set, with everything it needs
    checked now: what is wrong here would fail every VM's start."""
    if not settings.firecracker_jailer:
        return None
    binary = shutil.which(settings.firecracker_jailer)
    if binary is None:
        raise StartupError(
            f"HATCH_FIRECRACKER_JAILER={settings.firecracker_jailer} is not an executable file "
            "(give its path, or a name on PATH)"
        )
    if os.geteuid() != 0:
        raise StartupError(
            "HATCH_FIRECRACKER_JAILER needs hatchd to run as root (the jailer chroots Firecracker "
            "and switches it to the VM's uid)"
        )
    uids = UidRange(settings.firecracker_uid_base, settings.firecracker_uid_count)
    base = settings.jail_base
    try:
        check_uid_range(uids)
        make_private_dir(base)
        check_jail_base(base, settings.data_dir, uids.base)
    except (JailError, OSError) as exc:
        raise StartupError(f"the Firecracker jailer cannot be used: {exc}") from None
    jailer = Jailer(os.path.abspath(binary), firecracker, base, uids, cgroups)
    log.info("firecracker runs jailed", where=jailer.describe())
    return jailer


async def _kvm_problem(settings: Settings) -> str | None:
    """Why KVM cannot run a guest here, or None. /dev/kvm can exist while guests hang under it,
    so a tiny guest is booted under KVM (with QEMU, the one tool at hand for it)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    return await probe_accel(settings.qemu_bin, "kvm")


def _build_cgroups(settings: Settings) -> VMCgroups | None:
    """The VMs' cgroups, or None (with one warning) where the host gives us none."""
    if settings.cgroups == "off":
        return None
    try:
        layout = find_layout(Path("/proc/self/mountinfo").read_text())
        if layout is None:
            raise CgroupError("no memory and cpu cgroup controllers are mounted")
        cgroups = VMCgroups(layout, settings.cgroup_parent)
        cgroups.prepare()
    except (CgroupError, OSError) as exc:
        if settings.cgroups == "required":
            raise StartupError(f"HATCH_CGROUPS=required but cgroups are unusable: {exc}") from None
        log.warning("running VMs without cgroups: no per-VM memory and CPU limits", reason=str(exc))
        return None
    log.info("each vm runs in its own cgroup", where=cgroups.describe())
    return cgroups


async def _build_store(settings: Settings) -> ArtifactStore:
    """S3 when HATCH_S3_BUCKET is set (checked now, not at the first snapshot), else local."""
    if not settings.s3_bucket:
        settings.snapshots_dir.mkdir(parents=True, exist_ok=True)
        return LocalStore(settings.snapshots_dir)
    store = S3Store(
        settings.s3_bucket,
        endpoint=settings.s3_endpoint,
        region=settings.s3_region,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
    )
    try:
        await store.check()
    except ArtifactError as exc:
        raise StartupError(f"snapshot bucket unusable (HATCH_S3_*): {exc}") from None
    return store


def raise_open_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard one: every proxied request holds two descriptors,
    and the usual soft default (1024) would cap the proxy far below its connection limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel caps descriptors at fs.nr_open anyway
        target = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("open-file limit not raised", soft=soft, hard=hard, reason=str(exc))
            return soft
        log.info("open-file limit raised", old=soft, new=target)
        return target
    return soft


async def serve(settings: Settings) -> None:
    raise_open_file_limit()
    make_private_dir(settings.data_dir)
    tightened = await asyncio.to_thread(tighten_tree, settings.data_dir, (settings.jail_base,))
    if tightened:
        log.info("made files in the data directory private", count=tightened)
    settings.vms_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url)
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    await register_default(settings, sessions)
    store = await _build_store(settings)

    if not become_subreaper():
        log.warning("cannot become the subreaper of VMM processes: exit codes will be unknown")
    vmm, accel = await _build_vmm(settings)
    network: HostNetwork | None = None
    if os.geteuid() == 0:
        network = HostNetwork(settings)
        await network.setup()
    else:
        log.warning("not running as root: VMs can only be created with enable_network=false")
    metrics = Metrics()
    consoles = Consoles(settings.console_max_bytes)
    agents = Agents(settings.agent_timeout, metrics)
    vms = VMService(settings, sessions, vmm, network, consoles, agents, metrics)
    liveness = Liveness(vms, metrics)
    snapshots = SnapshotService(settings, vms, store, metrics)
    routes = RouteService(settings, vms)
    await routes.load()
    templates = TemplateService(settings, vms)
    await templates.recover()  # a template build's VM is no VM reconciliation knows
    await reconcile(vms, snapshots)
    await snapshots.resume_stores()  # snapshots a crash left `storing`
    await snapshots.collect_all()  # what a crash left in the chunk store
    await snapshots.offer_standbys()  # reconciliation ended the last hatchd's
    await prune_images(settings, sessions)

    activity = Activity(vms)
    wake = WakeService(
        vms,
        snapshots,
        max_failures=settings.wake_max_failures,
        backoff=settings.wake_retry_backoff,
        metrics=metrics,
    )
    guest = GuestService(settings, vms, wake, activity)
    forks = ForkService(settings, vms, snapshots, guest)
    if settings.templates:
        await templates.enable(forks)
    verifier = build_verifier(settings, sessions)
    scrape = Scrape(metrics, sessions)
    app = create_app(
        Services(
            settings,
            sessions,
            verifier,
            vms,
            snapshots,
            routes,
            ExecService(guest),
            FileService(guest),
            forks,
        ),
        None if settings.metrics_host_port else scrape,
    )
    host, port = settings.http_host_port
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            http=guarded_protocol(_api_admission(settings), settings.api_head_timeout),
            ws="none",  # the API has no WebSocket route: an upgrade request is plain HTTP
        )
    )
    log.info(
        "hatchd listening",
        addr=f"{host}:{port}",
        vmm=(await vmm.capabilities()).name,
        accel=accel,
        data_dir=str(settings.data_dir),
        auth=verifier.name,
    )
    proxy = Proxy(settings, vms, routes, wake, activity, metrics)
    gateway = SSHGateway(settings, vms, wake, activity, metrics=metrics)
    reaper = IdleReaper(settings, snapshots, routes, activity)
    listener = await _start_metrics_listener(settings, scrape)
    try:
        await proxy.start()
    except OSError as exc:
        raise StartupError(
            f"proxy cannot listen on {settings.proxy_addr}: {exc.strerror}"
        ) from None
    await gateway.start()
    reaper.start()
    # uvicorn re-raises the SIGTERM it caught once it has stopped serving: by default that
    # would end hatchd there, before the shutdown below (stores called off, standbys ended).
    signal.signal(signal.SIGTERM, _shut_down)
    try:
        await server.serve()
    finally:
        if listener is not None:
            await listener.close()
        await reaper.close()
        await templates.close()
        await gateway.close()
        await proxy.close()
        await verifier.close()
        await liveness.close()
        await consoles.close()
        await agents.close()
        await snapshots.close()
        await engine.dispose()
    # VMs keep running: the next hatchd reattaches them.


def _shut_down(signum: int, frame: object) -> None:
    log.info("hatchd shutting down", signal=signal.Signals(signum).name)


def _api_admission(settings: Settings, name: str = "the API") -> Admission:
    """The connection limits of the API's listener (and of the metrics one, each its own)."""
    total = capped_by_fd_budget(settings.api_max_connections, name)
    return Admission(total, settings.api_max_connections_per_address, name)


async def _start_metrics_listener(settings: Settings, scrape: Scrape) -> MetricsListener | None:
    """GET /metrics on HATCH_METRICS_ADDR, when set (else the API's app serves it)."""
    if settings.metrics_host_port is None:
        return None
    host, port = settings.metrics_host_port
    guard = guarded_protocol(
        _api_admission(settings, "the metrics listener"), settings.api_head_timeout
    )
    listener = MetricsListener(metrics_app(scrape), host, port, guard)
    try:
        await listener.start()
    except OSError as exc:
        raise StartupError(
            f"metrics cannot listen on {settings.metrics_addr}: {exc.strerror}"
        ) from None
    log.info("metrics listening", addr=f"{host}:{port}")
    return listener


def _settings_help() -> str:
    """Every setting with its default and meaning, read from the Settings class itself."""
    lines = ["settings (environment variables, or a .env file in the working directory):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = (
            f"./{default}" if isinstance(default, Path) and not default.is_absolute() else default
        )
        shown = "" if shown is None else shown
        lines.append(f"  HATCH_{name.upper()}={shown}")
        lines.append(f"      {field.description}")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="hatchd",
        description="hatchd: the hatchvm daemon (REST API, HTTP proxy, SSH gateway, reaper). "
        "It takes no arguments: every setting is a HATCH_* environment variable.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hatchd {__version__}")
    parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    _parse_args(argv)  # --help and --version exit here, before anything is touched
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"hatchd: invalid configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format)
    os.umask(PRIVATE_UMASK)  # every file hatchd or its QEMUs write is the daemon's alone
    try:
        uvloop.run(serve(settings))  # a faster event loop: the proxy is on it
    except (StartupError, DatabaseUnreachable, NetworkError, VMMError) as exc:
        print(f"hatchd: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
