"""A warm ClientApp process for a SuperNode started with ``--isolation process``.

Usage (next to each ``flower-supernode --isolation process --port PORT ...``)::

    python -m fedforget.engine.warm_clientapp --runtime-api-address 127.0.0.1:PORT

Why: in Flower 1.42 a ``flwr-clientapp`` process serves **one** message and exits
(``flwr.supernode.runtime.run_clientapp`` ends with ``flwr_exit``). With the default
``--isolation subprocess`` the SuperNode starts ``flower-superexec``, which starts one
``flwr-clientapp`` per message; with ``--isolation process`` the SuperNode starts nothing
and an executor outside it must take the tasks — Flower's own is again a
``flower-superexec`` launching one ``flwr-clientapp`` per task. Either way every message
pays a new interpreter, ``import torch`` and the client's data loading (about 30 s per
digits round with 4 nodes, see issue 10).

This process is such an executor that stays warm: it polls the SuperNode's Runtime API
for ClientApp tasks (``AcquireTask``, as ``flower-superexec`` does) and runs each one
**in this process**, with the steps of ``flwr-clientapp`` (pull the task's message,
context, run and FAB; install the FAB; load the ClientApp; call it; push the reply and the
updated context; report the task finished). Imported modules, and whatever the ClientApp
caches at module level (fedforget's client caches its data and model per config), survive
from one message to the next. The ClientApp is loaded once per FAB; when a run with
another FAB arrives, the modules loaded from the previous FAB's directory are dropped and
the new FAB's are imported.

What it trades: Flower isolates each message in its own process; here a ClientApp that
leaks state between messages (globals) would show it, and a crash of the ClientApp's code
that kills the interpreter ends this process (the SuperNode then waits for a reply that
never comes; run it under a supervisor that restarts it). It serves one node's tasks one at
a time, like ``flwr-clientapp``. It uses Flower's runtime internals (pinned ``<2``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedforget.engine.supernode import DEFAULT_MAX_POLL_INTERVAL, PULL_BACKOFF_CAP

log = logging.getLogger("fedforget.warm_clientapp")

DEFAULT_POLL_INTERVAL = 0.01

CLIENT_APP_TASK = "flwr-clientapp"  # flwr.supercore.constant.TaskType.CLIENT_APP


@dataclass
class _LoadedApp:
    fab_hash: str = ""
    app_dir: Path | None = None
    client_app: Any = None


@dataclass
class WarmClientApp:
    """Serve a SuperNode's ClientApp tasks in this process, one after the other.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API, ``host:port`` (its ``--host``/``--port``).
    root_certificates : str, optional
        CA file of the Runtime API's TLS (when the SuperNode serves it with
        ``--ssl-certfile``); plain HTTP on loopback otherwise.
    poll_interval, max_poll_interval : float
        Seconds between two asks for a task while there is none: ``poll_interval`` after a
        task, growing by half per empty ask up to ``max_poll_interval``.
    """

    runtime_api_address: str
    root_certificates: str | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL
    tasks_served: int = 0
    _loaded: _LoadedApp = field(default_factory=_LoadedApp)
    _stop: threading.Event = field(default_factory=threading.Event)

    # ------------------------------------------------------------------ main loop
    def serve(self, *, max_tasks: int | None = None) -> None:
        """Acquire and run tasks until :meth:`stop` (or ``max_tasks`` tasks)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        executor = self._client([RuntimeVersionHttpInterceptor(component_name="SuperExec")])
        request = AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK])
        wait = self.poll_interval
        try:
            while not self._stop.is_set():
                res = executor.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    self.tasks_served += 1
                    if max_tasks is not None and self.tasks_served >= max_tasks:
                        return
                    wait = self.poll_interval
                    continue
                self._stop.wait(wait)
                wait = min(self.max_poll_interval, wait * 1.5)
        finally:
            executor.close()

    def stop(self) -> None:
        """Ask :meth:`serve` to return after the current task."""
        self._stop.set()

    # ------------------------------------------------------------------ one task
    def run_task(self, token: str) -> None:
        """Run the task ``token`` grants, as ``flwr-clientapp --token`` would."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = self._client([RuntimeVersionHttpInterceptor(component_name=CLIENT_APP_TASK),
                               RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(_quiet_heartbeat(client))
        heartbeat.start()
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        started = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            pulled = time.perf_counter()
            client_app = self._client_app(run, fab)
            loaded = time.perf_counter()
            reply = client_app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
            log.info("task %s: pulled in %.3f s, app ready in %.3f s, ran in %.3f s",
                     message.metadata.message_type, pulled - started, loaded - pulled,
                     time.perf_counter() - loaded)
        except Exception as exc:  # a failing ClientApp must not end the warm process
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(exc)}:<'{exc}'>"
            if isinstance(exc, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log.error("ClientApp raised an exception:\n%s", traceback.format_exc())
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001 - reported, and the task is marked failed
                log.error("failed to push the reply:\n%s", traceback.format_exc())
                sub_status, details = SubStatus.FAILED, "failed to push the reply"
            heartbeat.stop()  # before the task ends: a late heartbeat would be refused
            push_task_output(client=client, context=context, sub_status=sub_status,
                             details=details)
            client.close()
            log.info("task done in %.3f s", time.perf_counter() - started)

    def _client_app(self, run: Any, fab: Any) -> Any:
        """The ClientApp of ``fab``, loaded once per FAB hash."""
        if self._loaded.client_app is not None and self._loaded.fab_hash == fab.hash_str:
            return self._loaded.client_app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if self._loaded.app_dir is not None:
            _forget_modules_under(self._loaded.app_dir)
        install_from_fab(fab.content, skip_prompt=True)
        app_dir = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)).resolve()
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        client_app = load(run.fab_id, run.fab_version, fab.hash_str)
        self._loaded = _LoadedApp(fab_hash=fab.hash_str, app_dir=app_dir,
                                  client_app=client_app)
        return client_app

    def _client(self, interceptors: list[Any]) -> Any:
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        certificates = (Path(self.root_certificates).read_bytes()
                        if self.root_certificates else None)
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=certificates is None,
            root_certificates=certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """The task's (message, context, run, FAB), as Flower's ``pull_task_input`` pulls them,
    with a short retry for the message's objects.

    The SuperNode makes the task before it has fetched the message's objects from the
    SuperLink; a task taken at once (this process polls every few ms) finds them missing,
    and Flower's pull waits 1 s, then 2 s, ... (``PULL_INITIAL_BACKOFF``) before asking
    again: 3 s lost per message. Here the retry starts at 5 ms and is capped at
    :data:`PULL_BACKOFF_CAP` (the SuperNode has the objects as soon as the SuperLink has
    them; a short cap keeps what waits on them short).
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message,
        initial_backoff=0.005,
        backoff_cap=PULL_BACKOFF_CAP,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def _quiet_heartbeat(client: Any) -> Any:
    """A task heartbeat that reports failure by returning False and never signals.

    (Flower's ``make_task_heartbeat_fn_http`` raises SIGINT when the task is no longer
    known, which ends a one-shot ``flwr-clientapp``; here it would end the warm process.)
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        return True

    return beat


def _forget_modules_under(directory: Path) -> None:
    """Drop the modules imported from ``directory`` (a previous FAB) and its path entry."""
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if origin and Path(origin).resolve().is_relative_to(directory):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != directory]


def _watch_parent(pid: int, worker: WarmClientApp) -> None:
    """End this process when ``pid`` (its SuperNode) is gone."""
    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                worker.stop()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Command line: serve one SuperNode's ClientApp tasks until stopped."""
    parser = argparse.ArgumentParser(prog="python -m fedforget.engine.warm_clientapp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, host:port (its --host/--port)")
    parser.add_argument("--root-certificates", default=None,
                        help="CA of the Runtime API's TLS, if the SuperNode serves it")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                        help="seconds between asks after a task (default "
                             f"{DEFAULT_POLL_INTERVAL}), growing while idle")
    parser.add_argument("--max-poll-interval", type=float, default=DEFAULT_MAX_POLL_INTERVAL,
                        help=f"at most this many seconds (default {DEFAULT_MAX_POLL_INTERVAL})")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process (the SuperNode) ends")
    parser.add_argument("--preload", default="", metavar="MODULE[,MODULE...]",
                        help="modules to import at start (e.g. torch), so that the first "
                             "message does not pay for them")
    parser.add_argument("--log-level", default="WARNING",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="INFO logs each task's timing (default WARNING)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.poll_interval <= args.max_poll_interval:
        parser.error(f"--poll-interval {args.poll_interval} --max-poll-interval "
                     f"{args.max_poll_interval}: expected 0 < interval <= max")
    worker = WarmClientApp(args.runtime_api_address, root_certificates=args.root_certificates,
                           poll_interval=args.poll_interval,
                           max_poll_interval=args.max_poll_interval)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for module in filter(None, (m.strip() for m in args.preload.split(","))):
        importlib.import_module(module)
    if args.parent_pid is not None:
        _watch_parent(args.parent_pid, worker)
    worker.serve()


if __name__ == "__main__":
    main()
