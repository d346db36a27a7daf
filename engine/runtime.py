"""The Ray runtime as the engine uses it: start or join Ray, quiet Ray Data, place model actors.

Devices come from the CLUSTER, never from the driver: a head without GPUs (the usual KubeRay layout)
still gets GPU actor pools on its GPU workers, and CUDA is checked inside each actor, where the model
runs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
#: Ray's notice that it turned token authentication on (its default for a new local cluster, and where
#: ~/.ray/auth_token exists): nothing for the user to do (``RAY_AUTH_MODE`` set explicitly silences it in Ray too)
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_worker_logs = True


def show_ray_worker_logs(show: bool) -> None:
    """Whether the output of Ray's worker processes is printed on this terminal (``ray.init``'s
    ``log_to_driver``) by the next ``init_ray``: Ray Train's controller and placement-group cleaner, Ray Data's
    split coordinators, their ``core_worker`` error lines. The CLI shows it only with ``--verbose``. Nothing
    that matters is lost: a failure inside Ray reaches the driver as its exception (``user_errors`` makes a
    UserError one line), the logs stay in Ray's session folder (``/tmp/ray/session_latest/logs``), and the
    raylet's warnings pushed to the driver (a task killed for memory, a worker pool growing large) still
    print: Ray sends them on another channel, which ``log_to_driver`` does not close."""
    global _worker_logs
    _worker_logs = show


#: lines Ray's C++ core worker writes straight to this process's stderr (file descriptor 2, below Python's
#: logging) that ask nothing of the user: Ray Data 2.60 hands every actor pool's constructor arguments
#: through the object store, so each embed / predict job printed this "E" line (ray-project/ray#53727)
_NATIVE_NOTICES = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
)


@contextmanager
def ray_native_notices_dropped(enabled: bool = True) -> Iterator[None]:
    """For the CLI process: drop Ray's known notices (``_NATIVE_NOTICES``) from what native code writes to file
    descriptor 2; every other such line passes, in its order. Python's own writers (rich bars, logging, the one-line
    errors, tracebacks) get ``sys.stderr`` on a copy of the real descriptor, so a terminal stays a terminal;
    only what writes descriptor 2 directly goes through the filter (a pipe read by a thread). Restored on exit."""
    if not enabled or sys.stderr is not sys.__stderr__:  # Python's stderr already taken (pytest, a notebook)
        yield
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):
        yield
        return

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not any(p.search(line) for p in _NATIVE_NOTICES):
                    os.write(real, line + b"\n")
        if pending:
            os.write(real, pending)
        os.close(read_end)

    python_stderr = sys.stderr
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(real, "w", buffering=1, encoding=getattr(python_stderr, "encoding", None) or "utf-8",  # noqa: SIM115
                      errors="backslashreplace", closefd=False)
    thread = threading.Thread(target=pump, name="ray-native-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.close()  # the wrapper only: it does not own the descriptor (closefd=False)
        sys.stderr = python_stderr
        os.dup2(real, 2)  # the pipe's last write end here closes: the thread drains it and ends
        # processes started meanwhile (a local Ray's) may still hold the pipe: do not wait for them
        thread.join(timeout=1.0)
        if not thread.is_alive():
            os.close(real)


class _RayNoticeFilter(logging.Filter):
    """Ray's token-auth notice, moved from the user's terminal to this module's debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_TOKEN_AUTH_NOTICE):
            log.debug("ray: %s", record.getMessage())
            return False
        return True


def init_ray(address: str | None = None, *, log_to_driver: bool | None = None) -> None:
    """Join the cluster named by ``address`` / ``RAY_ADDRESS``, or start an embedded local Ray
    (``address="local"``: always a new local one, never a cluster that happens to run here). The one
    place that calls ``ray.init``. ``log_to_driver``: print Ray's worker output here (default: as
    ``show_ray_worker_logs`` set it, on unless the CLI runs without ``--verbose``)."""
    import ray

    if ray.is_initialized():
        return
    notices = logging.getLogger(_TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _RayNoticeFilter) for f in notices.filters):
        notices.addFilter(_RayNoticeFilter())
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": False,
                              "log_to_driver": _worker_logs if log_to_driver is None else log_to_driver}
    if address == "local" or (address is None and "RAY_ADDRESS" not in os.environ):
        kwargs["include_dashboard"] = False  # embedded local Ray: no dashboard needed
    ray.init(address=address, **kwargs)


def quiet_ray_data() -> None:
    """Ray Data's per-operator logs and bars drown the CLI's own output (the engine draws its own bar, fed
    by the batches as they finish), and a task's UserError must reach the driver as itself."""
    import warnings

    import ray

    # SPREAD placement of actor pools has no named map_batches parameter yet; the notice is Ray's, not the user's
    warnings.filterwarnings("ignore", message=r".*ray_remote_args.*deprecated", category=Warning)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "raise_original_map_exception"):
        ctx.raise_original_map_exception = True
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind a Ray failure, if there is one: the exception itself or one of its causes. Ray
    Data raises the original error (``raise_original_map_exception``); a plain task's RayTaskError holds it
    as ``cause``; Ray Train's ``WorkerGroupError`` holds each failed worker's original exception in its
    public ``worker_failures`` (rank -> exception; Ray 2.60 unwraps its traceback wrapper there,
    ``ray/train/v2/_internal/execution/worker_group/poll.py``, ``WorkerGroupPollStatus.errors``)."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            # a RayTaskError (a plain task's failure): it may also be an instance of the remote error's class,
            # but its text is the remote traceback; the remote exception itself is its ``cause``
            todo.append(cause)
            continue
        if isinstance(e, UserError):
            return e
        failures = getattr(e, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> exception
        todo.extend([e.__cause__, e.__context__, *(failures.values() if isinstance(failures, dict) else ())])
    return None


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a remote UserError as itself (one line for the user) instead of Ray's wrapped traceback."""
    try:
        yield
    except Exception as err:  # a RayTaskError of a remote UserError is a UserError too, but prints a traceback
        user = user_error_in(err)
        if user is None or user is err:
            raise
        raise user from None


def parse_resources(items: list[str] | None) -> dict[str, float]:
    """``["accelerator=1", "A100=0.5"]`` -> ``{"accelerator": 1.0, "A100": 0.5}`` (CLI ``--actor-resource``)."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount) if sep else 1.0
        except ValueError:
            value = -1.0
        if not name or value <= 0:
            raise UserError(f"--actor-resource {item!r}: write NAME=AMOUNT with a positive amount, e.g. accelerator=1")
        out[name] = value
    return out


@dataclass(frozen=True)
class ActorPlan:
    """Where and how many model actors run: from the cluster's resources, not the driver's hardware."""

    device: str
    max_actors: int
    num_gpus: float = 0.0
    cpu_threads: int = 1
    resources: dict[str, float] = field(default_factory=dict)

    def map_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Dataset.map_batches`` for an actor pool of this plan (autoscaling from one
        actor up to ``max_actors``; a lost node's actors are replaced where resources remain)."""
        import ray

        kwargs: dict[str, Any] = {
            "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=self.max_actors),
            "num_gpus": self.num_gpus,
        }
        if self.resources:
            kwargs["resources"] = dict(self.resources)
        if self.device == "cpu" and not self.resources:
            kwargs["scheduling_strategy"] = "SPREAD"  # one model copy per node before two on one node
        return kwargs


def actor_plan(device: str | None = None, num_actors: int | None = None,
               resources: dict[str, float] | None = None, foundation: bool = True) -> ActorPlan:
    """Plan the model actors on the current cluster.

    * GPUs in the cluster (or ``device="cuda"``): one actor per GPU, ``num_gpus=1`` each.
    * ``resources`` (e.g. ``{"accelerator": 1}``): as many actors as the scarcest named resource allows;
      they land only on the nodes that have it.
    * otherwise CPU: one actor per node (spread), each using that node's share of CPU threads.
    """
    import ray

    if device is not None and device not in DEVICES:
        raise UserError(f"--device {device!r}: use one of {', '.join(DEVICES)} (or leave it out to use the "
                        "cluster's GPUs)")
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if device is None:
        device = "cuda" if gpus and foundation else "cpu"
    if device == "cuda" and not gpus:
        raise UserError("--device cuda but the Ray cluster has no GPU; add GPU workers or use --device cpu")
    resources = dict(resources or {})
    for name, amount in resources.items():
        if total.get(name, 0) < amount:
            have = ", ".join(sorted(k for k in total if not k.startswith("node:"))) or "none"
            raise UserError(f"actor resource {name}={amount:g} is not in the Ray cluster (it has: {have})")
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if num_actors is not None and num_actors < 1:
        raise UserError(f"--actors {num_actors}: give at least 1")
    if device == "cuda":
        n = num_actors or gpus
        return ActorPlan("cuda", n, num_gpus=1.0, resources=resources)
    if resources:
        n = num_actors or max(1, min(int(total.get(k, 0) // v) for k, v in resources.items()))
    else:
        n = num_actors or max(1, len(nodes))
    threads = max(1, int(total.get("CPU", 1)) // n)
    return ActorPlan("cpu", n, cpu_threads=threads, resources=resources)


def check_actor_device(device: str) -> None:
    """Inside an actor: the device it was planned for must exist on this node (one line if not)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        import socket

        raise UserError(f"a model actor was placed for CUDA on {socket.gethostname()}, where torch sees no GPU; "
                        "install a CUDA build of torch on the GPU workers or run with --device cpu")
