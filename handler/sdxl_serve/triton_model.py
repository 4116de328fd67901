"""The Triton adapter: a thin ``TritonPythonModel`` over ``RecyclingService``.

It does for Triton's python backend what ``torchserve_handler`` does for TorchServe: it
turns Triton's requests (one named tensor per request field) into ``Incoming`` items and
the service's replies into output tensors or error responses. Validation, batching, the
engine process and its recycling, encoding and the error messages are the core's, so a
seed gives the same image bytes through either server.

``triton_python_backend_utils`` exists only inside Triton's backend stub, so it is
imported in ``initialize``; the conversions around it are plain functions, tested alone.
The model repository's ``triton-models/sdxl/1/model.py`` imports the class from here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from sdxl_serve.cancellation import cancel_flag, own_folder
from sdxl_serve.contract import (FIELD_NAMES, SDXL_LIMITS, RequestError, parse_field,
                                 unknown_field)
from sdxl_serve.engine_process import EngineSpec
from sdxl_serve.metrics import MetricsRecorder, SPECS, GAUGE
from sdxl_serve.profiling import announced_profile_dir
from sdxl_serve.recycling import RecyclingService
from sdxl_serve.service import Incoming, Reply, error_replies, remove_cancel_flags
from sdxl_serve.settings import Settings

log = logging.getLogger(__name__)

# Every request field but `stream`: streaming is the `sdxl_stream` model's way of serving.
TENSOR_FIELDS = tuple(name for name in FIELD_NAMES if name != "stream")
_MAX_REQUEST_ID_CHARS = 100
# How often `sdxl` asks Triton whether a request's client has gone (a gRPC deadline or
# cancel): it has no step events to ask at, as `sdxl_stream` does. A tenth of a second is
# a few steps of SDXL on a GPU; each question is a small message to the backend.
CANCEL_POLL_S = 0.1
# Each stub's folder of cancel flags, named by its pid: a stub killed outright (or a Triton
# killed, or past its exit timeout) does not remove it, and a run directory's temp dir,
# kept across restarts, gained one per stub each time; the next stub removes those of
# stubs gone.
CANCEL_DIR_PREFIX = "sdxl-cancel-"


def field_value(name: str, array: np.ndarray) -> Any:
    """The one value a request's tensor holds, as the JSON request would hold it.

    Example:
        >>> field_value("prompt", np.array([[b"a red fox"]], dtype=object))
        'a red fox'
        >>> field_value("seed", np.array([[7]], dtype=np.uint64))
        7
        >>> field_value("width", np.array([[64, 64]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: `width` must hold one value ..., got shape [1, 2]; ...
    """
    if array.size != 1:
        shape = ", ".join(str(side) for side in array.shape)
        raise RequestError(name, f"`{name}` must hold one value per request (shape [1, 1]), "
                                 f"got shape [{shape}]; send one request per prompt and use "
                                 "`num_images` for more images")
    value = array.reshape(-1)[0]
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(name, f"`{name}` must be UTF-8 text: byte {exc.start} is not "
                                     "valid UTF-8") from None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value  # a str (BYTES tensors may hold them)


def request_fields(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A request body (the dict ``contract.parse_request`` validates) from named tensors.

    Absent tensors are absent fields, so the contract applies its defaults.

    Example:
        >>> request_fields({"prompt": np.array([[b"x"]], dtype=object),
        ...                 "num_inference_steps": np.array([[3]])})
        {'prompt': 'x', 'num_inference_steps': 3}
    """
    return {name: field_value(name, tensors[name]) for name in TENSOR_FIELDS
            if name in tensors}


# Request parameters that are Triton's own (sequence batching, priority, timeouts, output
# encoding, the generate endpoints' `stream`, and its `triton_*` switches), not fields.
TRITON_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority",
                               "timeout", "binary_data_output", "headers", "stream"})


def check_parameters(parameters: str, streaming: bool = False) -> None:
    """Refuse a request parameter that is neither Triton's own nor one of our inputs, and a
    ``stream`` that asks for what this model does not do (``streaming``: it is
    ``sdxl_stream``); it was accepted and ignored.

    Triton's generate endpoints turn every JSON key that is not a model input into a
    request parameter, so a misspelled field would otherwise be dropped without a word and
    its default used (TorchServe's path refuses it by name).

    Example:
        >>> check_parameters('{"stream": true, "triton_enable_empty_final_response": true}',
        ...                  streaming=True)
        >>> check_parameters('{"widht": 32}')
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: `widht` is not a known field (did you mean `width`?)
        >>> check_parameters('{"width": 32}')  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: `width` is an input of this model, not a parameter:
        send it as an input tensor (on `generate`, as a top-level key of the body)
        >>> check_parameters('{"stream": "yes"}')
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: `stream` must be true or false, got "yes" (a string)
        >>> check_parameters('{"stream": null}', streaming=True)
        >>> check_parameters('{"stream": true}')  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        sdxl_serve.contract.RequestError: `stream` true: this model answers once; the
        `sdxl_stream` model streams (its generate_stream)
    """
    for name, value in json.loads(parameters or "{}").items():
        if name == "stream":
            # The contract's own rule and words (a boolean's rule has no model bounds); null
            # is "not given", as in a body: this model's own way, whichever it is.
            value = streaming if value is None else parse_field("stream", value, SDXL_LIMITS)
        if name == "stream" and value != streaming:
            raise RequestError("stream", "`stream` true: this model answers once; the "
                                         "`sdxl_stream` model streams (its generate_stream)"
                               if value else
                               "`stream` false: this model streams; the `sdxl` model "
                               "answers once")
        if name in TENSOR_FIELDS:
            # Sent as a request parameter (`/infer`'s "parameters"): a known name, in the
            # wrong place. "Not a known field (did you mean it?)" would contradict itself.
            raise RequestError(name, f"`{name}` is an input of this model, not a parameter: "
                                     "send it as an input tensor (on `generate`, as a "
                                     "top-level key of the body)")
        if name not in TRITON_PARAMETERS and not name.startswith("triton_"):
            raise unknown_field(name)


def reply_outputs(reply: Reply) -> tuple[list[bytes], list[int], dict[str, Any]]:
    """(encoded images, their seeds, the rest of the reply) from a successful JSON reply.

    Example:
        >>> body = {"image": base64.b64encode(b"PNG").decode(), "seed": 7, "format": "png"}
        >>> reply_outputs(Reply(200, json.dumps(body).encode()))
        ([b'PNG'], [7], {'format': 'png'})
    """
    payload = reply.json()
    images = payload.pop("images", None) or [payload["image"]]
    seeds = payload.pop("seeds", None) or [payload["seed"]]
    payload.pop("image")
    payload.pop("seed")
    return [base64.b64decode(image) for image in images], [int(s) for s in seeds], payload


def error_message(reply: Reply) -> str:
    """The message of an error reply: the contract's for bad input (field, value, rule)."""
    try:
        payload = reply.json()
        return str(payload.get("message") or payload)
    except ValueError:
        return f"request failed with status {reply.status}"


def triton_error(status: int, message: str) -> tuple[str, str]:
    """(the ``TritonError`` code, the message) that best carry a reply status to a client.

    Triton 2.51's HTTP frontend gives each code one status (gRPC: its own code):
    INVALID_ARG 400, INTERNAL 500, UNAVAILABLE 503, NOT_FOUND 404, UNSUPPORTED 501, and
    400 for the rest. None gives 507 (out of GPU memory, the request's size and not a
    broken server: retrying it as it is fails again), so it goes as INTERNAL, its message
    starting with our status for a client to read; no code carries ``Retry-After`` either,
    but a 503's message says when to retry.

    Example:
        >>> triton_error(400, "`width` must be ...")
        ('INVALID_ARG', '`width` must be ...')
        >>> triton_error(507, "one 128x128 image does not fit in GPU memory")
        ('INTERNAL', '507 OutOfMemory: one 128x128 image does not fit in GPU memory')
        >>> triton_error(503, "retry in 30 s")
        ('UNAVAILABLE', 'retry in 30 s')
    """
    if status < 500:
        return "INVALID_ARG", message
    if status == 503:
        return "UNAVAILABLE", message
    if status == 507:
        return "INTERNAL", f"507 OutOfMemory: {message}"
    return "INTERNAL", message


def safe_request_id(given: str) -> str:
    """The client's request id when it is short and printable (it reaches our logs), else
    a fresh one."""
    if given and len(given) <= _MAX_REQUEST_ID_CHARS and given.isprintable():
        return given
    return uuid.uuid4().hex


def request_id_of(request) -> str:
    """``safe_request_id`` of a Triton request's id; one that is not UTF-8 is replaced too.

    Triton's HTTP frontend passes the body's ``id`` on as sent, and reading one that is not
    UTF-8 raises: out of ``execute``, that failed every request of the batch with a 500.
    """
    try:
        return safe_request_id(request.request_id())
    except UnicodeDecodeError:
        return uuid.uuid4().hex


def request_parameters(request) -> str:
    """A Triton request's parameters (JSON), refused by name when they are not UTF-8 (on
    ``generate``, every key of the body that is no input is a parameter), which Triton's
    HTTP frontend passes on as sent; reading them raised, answered as a 500."""
    try:
        return request.parameters()
    except UnicodeDecodeError:
        raise RequestError("parameters", "the request's parameters must be UTF-8 text (on "
                                         "`generate`, the keys of the body that are no "
                                         "input, and their values)") from None


def handler_config(model_config: Mapping[str, Any], model_dir: str) -> tuple[dict, str]:
    """(the ``handler:`` settings, the model version) named by config.pbtxt's parameters."""
    parameters = {key: value.get("string_value", "")
                  for key, value in (model_config.get("parameters") or {}).items()}
    config: dict = {}
    path = parameters.get("handler_config", "")
    if path:
        import yaml

        path = Path(model_dir, path).resolve()
        with open(path, encoding="utf-8") as file:
            config = dict((yaml.safe_load(file) or {}).get("handler") or {})
    return config, parameters.get("model_version", "")


def metrics_sink(pb_utils) -> Callable[[str, str, float, tuple[str, ...]], None]:
    """Feed our metrics to Triton's custom metrics API (python backend), which exports them
    on Triton's /metrics beside nv_inference_*: the same names and meanings as on
    TorchServe's, histograms written as cumulative ``_bucket``/``_sum``/``_count`` series."""
    helps = {series: spec.help for spec in SPECS for series, *_ in spec.series()}
    labels = {series: names for spec in SPECS for series, _, _, names in spec.series()}
    families: dict[str, Any] = {}
    metrics: dict[tuple, Any] = {}

    def sink(name: str, kind: str, value: float, values: tuple[str, ...]) -> None:
        family = families.get(name)
        if family is None:
            kind_code = (pb_utils.MetricFamily.GAUGE if kind == GAUGE
                         else pb_utils.MetricFamily.COUNTER)
            family = families[name] = pb_utils.MetricFamily(name, helps.get(name, name),
                                                            kind_code)
        key = (name, values)
        metric = metrics.get(key)
        if metric is None:
            metric = metrics[key] = family.Metric(dict(zip(labels[name], values)))
        if kind == GAUGE:
            metric.set(float(value))
        else:
            metric.increment(float(value))

    return sink


class TritonPythonModel:
    """Serves text-to-image requests from Triton's python backend, batch by batch.

    A decoupled model (``sdxl_stream``: ``model_transaction_policy { decoupled: true }``)
    streams: one response per denoising step (``info`` only), then the image, base64
    (``image_base64``), since generate_stream writes JSON. A stream whose client has gone
    gets nothing more, and a pipeline call whose clients have all gone stops at its next
    step; so does one of ``sdxl`` whose clients have all gone (a gRPC deadline or cancel),
    seen by asking Triton every ``CANCEL_POLL_S`` while it runs.
    """

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        # The stub sets up no logging: our INFO lines (ready, a request cancelled) were
        # dropped, and warnings went out bare. To stderr, which is Triton's log, marked.
        if not logging.getLogger().handlers:
            logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                                format=f"[{args['model_name']} stub {os.getpid()}] "
                                       f"%(levelname)s %(name)s: %(message)s")
        # 1. Settings: the same handler section and SDXL_* variables as under TorchServe.
        model_config = json.loads(args["model_config"])
        self.stream = bool((model_config.get("model_transaction_policy") or {})
                           .get("decoupled"))
        config, version = handler_config(model_config, args["model_repository"])
        settings = Settings.from_mapping(config)
        version = settings.model_version or version
        if not settings.model_dir:
            raise ValueError("no model to serve: set SDXL_MODEL_DIR (or model_dir in the "
                             "handler config) to a diffusers-format SDXL directory")
        # 2. The engine process: on the instance's GPU for KIND_GPU, else as `device` says.
        gpu_id = (int(args["model_instance_device_id"])
                  if args.get("model_instance_kind") == "GPU" else None)
        if settings.profile_every_n_requests:
            # Triton's temp directory (under serve_triton.py: the run dir's tmp/).
            config = dict(config, profile_dir=announced_profile_dir(
                settings.profile_every_n_requests, settings.profile_dir))
        spec = EngineSpec(settings.model_dir, config, gpu_id, version)
        metrics = MetricsRecorder(metrics_sink(pb_utils), args["model_name"], version,
                                  args.get("model_instance_name", str(os.getpid())))
        # Triton's queue is not ours to read (TorchServe's management API is): no depth gauge.
        self.service = RecyclingService(spec, settings, metrics, None)
        self.engine_info = self.service.start()  # loaded and warmed up: now READY
        self.service.start_upkeep()
        # Where a cancelled request's flag file is made for the engine process to see.
        self.cancel_dir = own_folder(tempfile.gettempdir(), CANCEL_DIR_PREFIX)
        log.info("model %s version %s ready (engine process %s)", args["model_name"],
                 version, self.engine_info.get("pid"))

    def execute(self, requests: list) -> list | None:
        """One response per request (or, streaming, a response sender's series of them)."""
        pb = self.pb
        responses: list = [None] * len(requests)
        items, positions = [], []
        senders = ([request.get_response_sender() for request in requests]
                   if self.stream else None)
        cancelled: set[int] = set()  # requests whose client has gone
        refused: list[int] = []  # statuses of requests answered here, not by the service
        # 1. Tensors to request bodies; a body Triton's types let through but our
        # conversion refuses (a batch of prompts in one request, bad UTF-8) fails alone.
        for index, request in enumerate(requests):
            request_id = request_id_of(request)
            if request.is_cancelled():
                # Its client went while it waited in Triton's queue: Triton 2.51's dynamic
                # batcher still hands it over (measured), so it is not run here.
                log.info("request %s cancelled by its client before it ran", request_id)
                responses[index] = self._cancelled()
                refused.append(499)
                continue
            try:
                tensors = {name: tensor.as_numpy() for name in TENSOR_FIELDS
                           if (tensor := pb.get_input_tensor_by_name(request, name))
                           is not None}
                body = request_fields(tensors)
                check_parameters(request_parameters(request), self.stream)
            except RequestError as exc:
                responses[index] = self._error(400, str(exc))
                refused.append(400)
                continue
            except Exception:  # noqa: BLE001 - this request fails alone, the stub lives on
                log.exception("request %s: reading its tensors failed", request_id)
                responses[index] = self._error(500, "reading the request's tensors failed; "
                                                    f"quote request id {request_id}")
                refused.append(500)
                continue
            if self.stream:
                body["stream"] = True
            items.append(Incoming(body=body, request_id=request_id,
                                  cancel_flag=cancel_flag(self.cancel_dir, uuid.uuid4().hex)))
            positions.append(index)

        # 2. The core: validation, one pipeline call per compatible group, encoding. A
        # client that goes (a gRPC cancel or deadline, a generate_stream connection closed)
        # is seen at a stream's next step, or by the watch below: nothing more is sent to
        # it, and a pipeline call all of whose clients have gone stops at its next step (the
        # engine process sees the flags).
        def cancel(position: int, at: str) -> None:
            cancelled.add(positions[position])
            Path(items[position].cancel_flag).touch()
            log.info("request %s cancelled by its client %s", items[position].request_id, at)

        def progress(position: int, event: dict) -> None:
            index = positions[position]
            if index in cancelled:
                return
            if senders[index].is_cancelled():
                cancel(position, f"at step {event.get('step')} of {event.get('total')}")
                return
            info = pb.Tensor("info", np.array([[json.dumps(event).encode()]], dtype=object))
            senders[index].send(pb.InferenceResponse(output_tensors=[info]))

        # Counted as TorchServe's path counts them, where the service itself refuses them;
        # before the watcher starts, so nothing between its start and the `try` can raise.
        self.service.record_refused(refused)

        served = threading.Event()

        def watch() -> None:
            try:
                while not served.wait(CANCEL_POLL_S):
                    for position, index in enumerate(positions):
                        if index not in cancelled and requests[index].is_cancelled():
                            cancel(position, "while it ran")
            except Exception as exc:  # noqa: BLE001 - unwatched, the batch is still served
                log.warning("watching a batch for cancelled requests failed (%s: %s); it "
                            "runs to its end", type(exc).__name__, exc)

        watcher = None
        if items and not self.stream:
            watcher = threading.Thread(target=watch, name="sdxl-cancel-watch", daemon=True)
            watcher.start()
        try:
            replies = self.service.handle(items, progress if self.stream else None)
        except Exception as exc:  # noqa: BLE001 - the service answers errors itself
            # As the service answers a batch that failed as one: each request its own typed
            # 500, never the exception's words (they may quote the request), and the
            # traceback logged once, naming every request (it was once per request; under
            # TorchServe, TorchServe logs such an exception once per batch too).
            replies = error_replies(exc, [item.request_id for item in items])
        finally:
            served.set()
            if watcher is not None:
                watcher.join()  # it asks about these requests: not once they are answered
        remove_cancel_flags(items)
        # 3. Replies to output tensors or errors naming field, value and rule; a cancelled
        # request's CANCELLED error in place of an image or an error nobody reads.
        for index, reply in zip(positions, replies):
            responses[index] = (self._cancelled() if index in cancelled
                                else self._response(reply))
        if not self.stream:
            return responses
        # A cancelled request still gets its final flag (Triton waits for it).
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for index, (sender, response) in enumerate(zip(senders, responses)):
            if sender.is_cancelled():
                response = self._cancelled()
            try:
                sender.send(response, flags=final)
            except Exception as exc:  # noqa: BLE001 - its client is gone; the others are not
                log.warning("the final response of request %d of the batch was not sent "
                            "(%s: %s)", index, type(exc).__name__, exc)
        return None

    def _response(self, reply: Reply):
        pb = self.pb
        if reply.status != 200:
            return self._error(reply.status, error_message(reply))
        images, seeds, rest = reply_outputs(reply)
        if self.stream:
            image = pb.Tensor("image_base64", np.array(
                [[base64.b64encode(data) for data in images]], dtype=object))
        else:
            image = pb.Tensor("image", np.array([images], dtype=object))
        return pb.InferenceResponse(output_tensors=[
            image,
            pb.Tensor("seed", np.array([seeds], dtype=np.uint64)),
            pb.Tensor("info", np.array([[json.dumps(rest).encode()]], dtype=object)),
        ])

    def _error(self, status: int, message: str):
        """An error response; Triton's HTTP status follows the code (``triton_error``)."""
        code, message = triton_error(status, message)
        error = self.pb.TritonError
        return self.pb.InferenceResponse(output_tensors=[],
                                         error=error(message, getattr(error, code)))

    def _cancelled(self):
        """The answer to a request whose client has gone (Triton still wants one)."""
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(
            "the client cancelled the request", self.pb.TritonError.CANCELLED))

    def finalize(self) -> None:
        self.service.close()
        shutil.rmtree(self.cancel_dir, ignore_errors=True)
