"""The TorchServe adapter: a thin ``BaseHandler`` over ``RecyclingService``
(``GenerationService`` in an engine process replaced at its budget).

It turns TorchServe's list of requests into ``Incoming`` items and the service's replies
into per-request statuses, headers and bodies. Everything else lives in the core.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from sdxl_serve.cancellation import CANCEL_HEADER, cancel_flag, leave_cancel_probe
from sdxl_serve.engine_process import EngineSpec
from sdxl_serve.management import DEFAULT_MANAGEMENT_ADDRESS, HEALTH_HEADER, HEALTH_VALUE, \
    KeyFile, QueueDepth, torchserve_key_file
from sdxl_serve.metrics import DeferredSink, MetricsRecorder
from sdxl_serve.profiling import announced_profile_dir
from sdxl_serve.recycling import RecyclingService
from sdxl_serve.service import STREAM_TYPE, Incoming, remove_cancel_flags
from sdxl_serve.settings import Settings

log = logging.getLogger(__name__)

# Where build_archive.py puts the embedded model inside the archive.
ARCHIVED_MODEL_FOLDER = "model"
_PHRASES = {200: "OK", 400: "Bad Request", 413: "Payload Too Large",
            415: "Unsupported Media Type", 500: "Internal Server Error",
            503: "Service Unavailable", 507: "Insufficient Storage"}


def worker_id(argv: list[str]) -> str:
    """TorchServe's id of this worker (``9000`` for W-9000), from the socket it was given.

    Example:
        >>> worker_id(["model_service_worker.py", "--sock-name", "/tmp/.ts.sock.9000"])
        '9000'
    """
    for flag in ("--sock-name", "--port"):
        if flag in argv[:-1]:
            return argv[argv.index(flag) + 1].rsplit(".", 1)[-1]
    return str(os.getpid())


def metrics_sink(metrics_cache, max_delay_s: float) -> DeferredSink:
    """Feed our metrics to TorchServe's metrics cache (declared in config/metrics.yaml),
    which prints them for the frontend to export on /metrics; when no batch is being served,
    and every ``max_delay_s`` at the latest (``DeferredSink``)."""
    from ts.metrics.metric_type_enum import MetricTypes

    def sink(name: str, kind: str, value: float, labels: tuple[str, ...]) -> None:
        metrics_cache.get_metric(name, MetricTypes(kind)).add_or_update(value, list(labels))

    return DeferredSink(sink, max_delay_s=max_delay_s)


def _is_describe(row: dict, headers: dict) -> bool:
    """Whether a lone row is TorchServe's customized describe, not a client's prediction.

    TorchServe sends the describe as a row with no parameters, with the management call's
    own headers and `describe: True` added. A prediction that reaches the handler with no
    parameters is a form post with no fields (Netty splits a form and never hands over its
    body), so it carries a form Content-Type: a client's own `describe` header on one got
    the worker's pids.
    """
    names = {str(name).lower(): value for name, value in headers.items()}
    return not row and names.get("describe") == "True" and "content-type" not in names


class SDXLHandler(BaseHandler):
    """Serves text-to-image requests with an SDXL pipeline, batch by batch."""

    def initialize(self, context) -> None:
        # TorchServe json.loads() bodies before we see them unless this is "false"; that
        # parser accepts NaN and hides the raw bytes. It is read per request in this process.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        properties = context.system_properties
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        settings = Settings.from_mapping(config)
        model_dir = settings.model_dir or os.path.join(properties["model_dir"],
                                                       ARCHIVED_MODEL_FOLDER)
        manifest = getattr(context, "manifest", None) or {}
        version = settings.model_version or manifest.get("model", {}).get("modelVersion", "")
        config = dict(config)
        if settings.profile_every_n_requests:
            # Profiles go beside TorchServe's logs unless a directory is set (profiling.py).
            config["profile_dir"] = announced_profile_dir(
                settings.profile_every_n_requests, settings.profile_dir, os.getppid())
        # The pipeline lives in an engine process this worker replaces at its budget.
        spec = EngineSpec(model_dir, config, properties.get("gpu_id"), version)
        self.model_version = version
        metrics = queue_depth = None
        if getattr(context, "metrics", None) is not None:
            sink = metrics_sink(context.metrics, settings.metrics_interval_s)
            metrics = MetricsRecorder(sink, context.model_name, version, worker_id(sys.argv))
            address = (settings.management_address or
                       os.environ.get("TS_MANAGEMENT_ADDRESS") or DEFAULT_MANAGEMENT_ADDRESS)
            # Its own frontend: never through the proxy of the worker's environment.
            keys = KeyFile(settings.key_file or torchserve_key_file(), address, direct=True)
            queue_depth = QueueDepth(keys, context.model_name, version)
        self.cancel_dir, self.cancel_probe = settings.cancel_dir, ""
        if self.cancel_dir:
            # A file the dispatcher must see in its own cancel directory (describe): set to
            # another directory, its flags would go where no worker looks, silently.
            try:
                self.cancel_probe = leave_cancel_probe(self.cancel_dir)
            except OSError as exc:  # read-only: flags are still seen, only not checked
                log.warning("cancel_dir %s: no probe file for the dispatcher (%s)",
                            self.cancel_dir, exc)
        self.service = RecyclingService(spec, settings, metrics, queue_depth)
        self.engine_info = self.service.start()  # loaded and warmed up: now READY
        self.service.start_upkeep()
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        """One reply per request in ``data``; each with its own status."""
        if len(data) == 1 and _is_describe(data[0], context.get_all_request_header(0)):
            return [json.dumps(self.describe())]
        items = []
        for index, row in enumerate(data):
            headers = {k.lower(): v for k, v in context.get_all_request_header(index).items()}
            body = row.get("body") if row.get("body") is not None else row.get("data")
            if body is None:
                body = b""  # a form post: Netty split it into fields and the JSON is lost
            health = str(headers.get(HEALTH_HEADER, "")).lower() == HEALTH_VALUE
            # Beside the body, TorchServe puts a URL's query parameters in the row, on the
            # routes that pass them (/invocations, /models/<name>/invoke, /<name>/predict;
            # /predictions drops them before the worker). `model_name` is its own. A form
            # post has no body row, only its fields: the body check says to send JSON.
            outside = tuple(str(name) for name in row
                            if name not in ("body", "data", "model_name")) \
                if "body" in row or "data" in row else ()
            # TorchServe puts the names of the request's parameters among its headers too,
            # each with a dict: a form field named so is no header.
            encoding = headers.get("content-encoding", "")
            items.append(Incoming(body=body, request_id=context.get_request_id(index) or "",
                                  accept=str(headers.get("accept", "")), health=health,
                                  cancel_flag=self._cancel_flag(headers),
                                  outside_body=outside,
                                  content_encoding=encoding if isinstance(encoding, str) else ""))

        streaming: set[int] = set()

        def progress(index: int, event: dict) -> None:
            if index not in streaming:
                # TorchServe sends a stream's HTTP headers with its first chunk and drops the
                # final reply's: what is known before the first step goes with it.
                streaming.add(index)
                context.set_response_content_type(index, STREAM_TYPE)
                if self.model_version:
                    context.set_response_header(index, "X-Model-Version", self.model_version)
            send_intermediate_predict_response(
                {index: json.dumps(event) + "\n"}, {index: context.get_request_id(index)},
                "Intermediate response", 200, context)

        try:
            replies = self.service.handle(items, progress)
        finally:
            remove_cancel_flags(items)  # the dispatcher never learns when the batch ended
        bodies = []
        for index, reply in enumerate(replies):
            context.set_response_status(reply.status, _PHRASES.get(reply.status, ""), index)
            context.set_response_content_type(index, reply.content_type)
            for key, value in reply.headers.items():
                context.set_response_header(index, key, value)
            # A stream's last line ends as its steps do: a reader that waits for the newline
            # (bash's `while read line`) would not see the result otherwise.
            bodies.append(reply.body + b"\n" if index in streaming else reply.body)
        return bodies

    def _cancel_flag(self, headers: dict) -> str:
        """The request's cancel flag (``cancellation.cancel_flag``); a token that is not ours is
        ignored, with a warning: only the dispatcher sends one."""
        token = headers.get(CANCEL_HEADER.lower())
        if token is None:
            return ""
        token = token.decode(errors="replace") if isinstance(token, bytes) else str(token)
        flag = cancel_flag(self.cancel_dir, token)
        if not flag and self.cancel_dir:
            log.warning("%s ignored: not 32 lowercase hex digits (%d characters)",
                        CANCEL_HEADER, len(token))
        return flag

    def describe(self) -> dict:
        """What ``GET /models/<name>/<version>?customized=true`` reports for this worker.

        TorchServe queues that call behind the batches this worker has already taken, so its
        answer (with this worker's pid) proves the worker has finished them: rollout.py uses
        it to drain a version before scaling it down.
        """
        engine = self.service.engine
        return {"model_version": self.service.spec.model_version, "pid": os.getpid(),
                "engine_pid": engine.pid if engine is not None else None,
                "engines_started": self.service.engines_started,
                # The job API validates sizes and image counts with the served model's bounds.
                "limits": self.engine_info.get("limits"),
                # The dispatcher warns when its canceled jobs could not stop their batches.
                "cancel_flags": bool(self.cancel_dir), "cancel_probe": self.cancel_probe}
