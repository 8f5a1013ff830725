"""Stage workers on the hosts of a Ray cluster: the :class:`~runtime.serve.launcher.Launcher`
the gateway uses with ``--ray``.

Each stage is a Ray actor placed on the node of its plan host (node affinity, not soft), asking
Ray for its device (``num_gpus=1`` for a GPU stage, so Ray's accounting keeps other work off
it) and no CPU (a CPU stage's kernels get threads: the node's CPUs shared among the CPU stages
placed there). The actor writes what the stage needs onto its node (the plan, and the CURVE
key files when the deployment has keys, in a private directory), checks that the model path
exists there, and starts the same worker process a local stage runs (``python -m
runtime.serve.worker``), bound to the node's address; that process dies with the actor. The
stage's pid is the worker's; killing it (or the actor) ends the stage, which the gateway sees
on its next poll and relaunches through Ray on the same node. The worker's log, written on its
node, is copied into the gateway's log directory as it grows.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from planner.plan import Plan
from runtime.cluster.ray_nodes import RayNode, alive_nodes, node_ip, pinned, ray_module
from runtime.errors import RuntimeFailure
from runtime.serve.launcher import StageLaunch, child_env, stages_take_turns

ACTOR_START_TIMEOUT_S = 120.0
LOG_FOLLOW_S = 1.0
"""How often a stage's log is copied from its node to the gateway's log directory, seconds."""
LOG_CHUNK_BYTES = 1 << 16
LOG_DRAIN_CHUNKS = 64
_DIR_PREFIX = "pqctl-stage-"
_PR_SET_PDEATHSIG = 1


class RayLaunchError(RuntimeFailure):
    """A stage cannot be placed: its host is not in the Ray cluster, or the node refused it."""

    title = "cannot start stage"


def _remove_stale_dirs() -> None:
    """Stage directories whose actor died without cleaning up (killed): their owner's pid is
    in the name."""
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*"):
        pid = path.name.removeprefix(_DIR_PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def _die_with_parent() -> None:
    """In the worker, before exec: SIGKILL when the actor process that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class StageActor:
    """Runs on the stage's node (as a Ray actor): starts the worker and reports on it."""

    def __init__(
        self,
        launch: StageLaunch,
        plan_text: str,
        key_files: dict[str, bytes],
        cuda_index: int | None,
    ) -> None:
        self.ip = node_ip()
        checkpoint = launch.checkpoint  # checked before any file is written
        if checkpoint is not None and not checkpoint.exists():
            raise RayLaunchError(
                f"the model path {checkpoint} does not exist on this host "
                f"({os.uname().nodename}, {self.ip}); put the checkpoint at the same path on "
                "every host, or plan a hub id"
            )
        _remove_stale_dirs()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-"))
        self.dir.chmod(0o700)
        plan = self.dir / "plan.json"
        plan.write_text(plan_text)
        keys = None
        if key_files:
            keys = self.dir / "keys"
            for name, data in key_files.items():
                path = keys / name
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                path.write_bytes(data)
                path.chmod(0o600)
        here = replace(launch, plan=plan, bind_host=self.ip, keys=keys, log=self.dir / "stage.log")
        env = child_env()
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the plan names the device: cuda:<index>
        if cuda_index is None:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if launch.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(launch.threads)
        with open(self.dir / "stage.log", "ab") as out:
            self.process = subprocess.Popen(
                here.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )
        self.exited, self.log_kept = threading.Event(), b""
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        """Once the worker exits, its directory (plan, key files) goes; the log is kept in
        memory for :meth:`read_log`."""
        self.process.wait()
        self.log_kept = self._log_bytes()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.exited.set()

    def _log_bytes(self) -> bytes:
        try:
            return (self.dir / "stage.log").read_bytes()
        except OSError:
            return b""

    def read_log(self, offset: int) -> bytes:
        """The worker's log from byte ``offset`` on, at most ``LOG_CHUNK_BYTES``."""
        if self.exited.is_set():
            return self.log_kept[offset : offset + LOG_CHUNK_BYTES]
        try:
            with open(self.dir / "stage.log", "rb") as log:
                log.seek(offset)
                return log.read(LOG_CHUNK_BYTES)
        except OSError:
            return b""

    def pid(self) -> int:
        return self.process.pid

    def wait(self) -> int:
        """Blocks until the worker exits; its exit code."""
        return self.process.wait()

    def signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(number)


class RayStage:
    """A stage on a Ray node, as the gateway sees it (:class:`StageHandle`). Nothing here
    blocks the gateway's loop: the actor starts in the background; ``pid`` is 0 until it has,
    and a stage Ray could not start (its constructor failed, or it waited for its device longer
    than ``ACTOR_START_TIMEOUT_S``) exits with code 1, its reason in ``error``."""

    def __init__(self, actor: Any, host: str, log: Path | None) -> None:
        self._ray, self.actor, self.host, self.log = ray_module(), actor, host, log
        self._pid_ref, self._pid = actor.pid.remote(), 0
        self._waiting = actor.wait.remote()
        self._code: int | None = None
        self._asked = time.monotonic()
        self.error: str | None = None
        self._log_offset, self._log_ref, self._log_asked = 0, None, 0.0

    @property
    def pid(self) -> int:
        if self._pid == 0 and self._ready(self._pid_ref):
            with contextlib.suppress(self._ray.exceptions.RayError):
                self._pid = int(self._ray.get(self._pid_ref))
        return self._pid

    def _ready(self, ref: Any) -> bool:
        ready, _ = self._ray.wait([ref], timeout=0)
        return bool(ready)

    def exit_code(self) -> int | None:
        if self._code is not None:
            return self._code
        if self.pid == 0 and self._ready(self._pid_ref):  # the actor never started its worker
            try:
                self._ray.get(self._pid_ref)
            except self._ray.exceptions.RayError as exc:
                self.error, self._code = f"on {self.host}: {_cause(exc)}", 1
                return self._code
        if self.pid == 0 and time.monotonic() - self._asked > ACTOR_START_TIMEOUT_S:
            self._ray.kill(self.actor, no_restart=True)
            self.error = (
                f"Ray did not start it on {self.host} within {ACTOR_START_TIMEOUT_S:g} s "
                "(is its device free there?)"
            )
            self._code = 1
            return self._code
        self._follow_log()
        if self._ready(self._waiting):
            try:
                self._code = int(self._ray.get(self._waiting))
            except self._ray.exceptions.RayError:
                self._code = -int(signal.SIGKILL)  # the actor died with its worker
            self._keep_log()
        return self._code

    def _follow_log(self) -> None:
        """Copy what the worker wrote to its log on its node into ``log`` here, once a second
        (the gateway calls :meth:`exit_code` on every pass of its loop; this never waits)."""
        if self.log is None or self._pid == 0:
            return
        if self._log_ref is None:
            if time.monotonic() - self._log_asked >= LOG_FOLLOW_S:
                self._log_ref = self.actor.read_log.remote(self._log_offset)
                self._log_asked = time.monotonic()
            return
        if not self._ready(self._log_ref):
            return
        ref, self._log_ref = self._log_ref, None
        with contextlib.suppress(self._ray.exceptions.RayError, OSError):
            self._append(self._ray.get(ref))

    def _append(self, chunk: bytes) -> None:
        if chunk and self.log is not None:
            with open(self.log, "ab") as out:
                out.write(chunk)
            self._log_offset += len(chunk)

    def terminate(self) -> None:
        if self._code is None:
            with contextlib.suppress(self._ray.exceptions.RayError):
                self.actor.signal.remote(int(signal.SIGTERM))

    def kill(self) -> None:
        self._keep_log()
        self._ray.kill(self.actor, no_restart=True)
        if self._code is None:
            self._code = -int(signal.SIGKILL)

    def _keep_log(self) -> None:
        """The rest of the worker's log, copied here before the actor goes (bounded: at most
        ``LOG_DRAIN_CHUNKS`` chunks, 5 s each)."""
        if self.log is None or self._pid == 0:
            return
        with contextlib.suppress(self._ray.exceptions.RayError, OSError):
            if self._log_ref is not None:
                ref, self._log_ref = self._log_ref, None
                self._append(self._ray.get(ref, timeout=5))
            for _ in range(LOG_DRAIN_CHUNKS):
                chunk = self._ray.get(self.actor.read_log.remote(self._log_offset), timeout=5)
                self._append(chunk)
                if len(chunk) < LOG_CHUNK_BYTES:
                    break


class RayLauncher:
    """Starts each stage of ``plan`` through a Ray actor on its host's node (module docstring).

    Raises:
        RayLaunchError: a stage's host is not an alive node of the connected Ray cluster.
    """

    def __init__(self, plan: Plan, plan_path: Path, keys_dir: Path | None) -> None:
        self.key_files = _key_files(keys_dir) if keys_dir is not None else {}
        self.use(plan, plan_path)

    def use(self, plan: Plan, plan_path: Path) -> None:
        """Start the stages of this plan from now on (after a re-plan)."""
        self.plan = plan
        self.plan_text = plan_path.read_text()
        self.nodes = nodes_for(plan)
        cpu_stages = Counter(s.device.host for s in plan.stages if s.device.index < 0)
        turns = stages_take_turns(plan.workload.global_batch, plan.micro_batching.prefill_size)
        self.threads = {  # the node's cores split among its CPU stages, unless they take turns
            host: self.nodes[host].cpus if turns else max(1, self.nodes[host].cpus // count)
            for host, count in cpu_stages.items()
        }

    def start(self, launch: StageLaunch) -> RayStage:
        ray = ray_module()

        stage = self.plan.stages[launch.stage]
        host, index = stage.device.host, stage.device.index
        node = nodes_for(self.plan, hosts=[host])[host]  # still alive (a restart after a loss)
        threads = self.threads.get(host) if index < 0 else None
        actor_class = ray.remote(max_restarts=0, max_concurrency=4)(StageActor)
        actor = actor_class.options(
            scheduling_strategy=pinned(node),
            num_cpus=0,
            num_gpus=1 if index >= 0 else 0,
            name=None,
        ).remote(
            replace(launch, threads=threads),
            self.plan_text,
            self.key_files,
            index if index >= 0 else None,
        )
        return RayStage(actor, host, launch.log)


def nodes_for(plan: Plan, hosts: list[str] | None = None) -> dict[str, RayNode]:
    """The alive node of every host the plan (or ``hosts``) names.

    Raises:
        RayLaunchError: naming the hosts Ray does not have, and those it has.
    """
    nodes = {n.host: n for n in alive_nodes()}
    wanted = hosts if hosts is not None else sorted({s.device.host for s in plan.stages})
    missing = [h for h in wanted if h not in nodes]
    if missing:
        raise RayLaunchError(
            f"the plan puts stages on {', '.join(missing)}, which the Ray cluster does not have "
            f"(its hosts: {', '.join(sorted(nodes)) or 'none'}); re-plan with pqctl plan --ray"
        )
    return {h: nodes[h] for h in wanted}


def _cause(exc: Exception) -> str:
    """The stage's own error when the actor's constructor raised one."""
    cause = getattr(exc, "cause", None)
    return str(cause) if isinstance(cause, Exception) else str(exc).splitlines()[0]


def _key_files(directory: Path) -> dict[str, bytes]:
    """A deployment's key files (what a stage reads), relative path → content."""
    wanted = ["server.key", "server.key_secret", "client.key", "client.key_secret"]
    files = {name: (directory / name).read_bytes() for name in wanted}
    for path in sorted((directory / "authorized").glob("*.key")):
        files[f"authorized/{path.name}"] = path.read_bytes()
    return files
