"""The TorchServe handler in process: a real ts.context.Context over the unpacked archive that
build_archive.py makes, the real tiny pipeline, and a socket standing in for the frontend's
connection (intermediate streaming messages are written to it by TorchServe's own code)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

pytestmark = pytest.mark.handler
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unpacked(model_store, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(model_store / "sdxl-1.0.mar") as archive:
        archive.extractall(target)
    return target


def make_context(model_dir: Path, headers: list[dict], metrics=None) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    context = Context("sdxl", str(model_dir), manifest, len(headers), None, "0.12.0",
                      model_yaml_config=config, metrics=metrics)
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"req-{i}" for i in range(len(headers))}
    return context


@pytest.fixture(scope="module")
def handler(unpacked):
    sys.path.insert(0, str(REPO / "handler"))
    # The entry point writes our records to stdout and stderr itself, as a worker needs, not
    # through the root logger's handlers (pytest's, here): put back for the tests after.
    ours = logging.getLogger("sdxl_serve")
    handlers, propagate = list(ours.handlers), ours.propagate
    import sdxl_serve_handler  # the archive's entry point, as TorchServe imports it

    # TorchServe's own metrics cache, from our metrics YAML, as the worker builds it.
    metrics = MetricsCacheYamlImpl(config_file_path=str(REPO / "config" / "metrics.yaml"))
    metrics.initialize_cache()
    sdxl_serve_handler.handle(None, make_context(unpacked, [{}], metrics))
    yield sdxl_serve_handler
    sdxl_serve_handler._handler.service.close()
    ours.handlers[:], ours.propagate = handlers, propagate


def rows(*bodies) -> list[dict]:
    return [{"body": body if isinstance(body, bytes) else json.dumps(body).encode()}
            for body in bodies]


def test_the_entry_point_initialises_once_with_the_archived_model(handler, unpacked):
    info = handler._handler.engine_info
    assert handler._handler.service.spec.model_version == "1.0"
    assert info["default_size"] == 64
    assert info["pipeline_calls"] >= 1  # warmed up before reporting ready


def test_a_mixed_batch_fails_only_its_bad_requests(handler, unpacked):
    context = make_context(unpacked, [{}, {}, {}, {}])
    bodies = handler.handle(rows({"prompt": "a", "seed": 1, "num_inference_steps": 2},
                                 {"prompt": "b", "width": 1004},
                                 b'{"prompt": "c", "guidance_scale": NaN}',
                                 {"prompt": "d", "seed": 2, "num_inference_steps": 2}),
                            context)
    statuses = [context.get_response_status(i)[0] for i in range(4)]
    assert statuses == [200, 400, 400, 200]
    assert json.loads(bodies[1])["field"] == "width"
    assert json.loads(bodies[2])["field"] == "body"
    assert json.loads(bodies[0])["seed"] == 1 and json.loads(bodies[3])["seed"] == 2
    assert context.get_response_headers(0)["X-Model-Version"] == "1.0"
    assert json.loads(bodies[1])["request_id"] == "req-1"


def test_accept_image_png_returns_raw_bytes(handler, unpacked):
    context = make_context(unpacked, [{"Accept": "image/png"}])
    [body] = handler.handle(rows({"prompt": "a", "seed": 1, "num_inference_steps": 2}), context)
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    assert context.get_response_content_type(0) == "image/png"
    assert context.get_response_headers(0)["X-Seed"] == "1"


def test_a_body_that_is_a_json_string_is_400_even_with_accept_image(handler, unpacked):
    # A JSON string holding a request's JSON was decoded a second time: with Accept
    # image/png it was a 500 (and a deep health check), without it a 200.
    wrapped = json.dumps(json.dumps({"prompt": "a", "num_inference_steps": 2})).encode()
    context = make_context(unpacked, [{"Accept": "image/png"}, {}])
    bodies = handler.handle(rows(wrapped, wrapped), context)
    for index, body in enumerate(bodies):
        assert context.get_response_status(index)[0] == 400, body
        refusal = json.loads(body)
        assert refusal["field"] == "body" and "got a string" in refusal["message"]


def test_accept_image_jpeg_with_a_null_output_format_is_jpeg(handler, unpacked):
    # null means "not given" for every optional field: no conflict with Accept.
    context = make_context(unpacked, [{"Accept": "image/jpeg"}])
    [body] = handler.handle(rows({"prompt": "a", "num_inference_steps": 2,
                                  "output_format": None}), context)
    assert context.get_response_status(0)[0] == 200
    assert body[:3] == b"\xff\xd8\xff" and context.get_response_content_type(0) == "image/jpeg"


def test_accept_listing_the_bodys_output_format_gets_that_format(handler, unpacked):
    # Both types acceptable, the body names one: the first listed won and the request was
    # refused for asking jpeg while Accept asked png.
    context = make_context(unpacked, [{"Accept": "image/png, image/jpeg"}])
    [body] = handler.handle(rows({"prompt": "a", "num_inference_steps": 2,
                                  "output_format": "jpeg"}), context)
    assert context.get_response_status(0)[0] == 200, body
    assert body[:3] == b"\xff\xd8\xff" and context.get_response_content_type(0) == "image/jpeg"


def test_accept_any_image_gets_the_bodys_format_or_png(handler, unpacked):
    # `image/*` matched no type, so a client that takes only images got JSON.
    context = make_context(unpacked, [{"Accept": "image/*"}, {"Accept": "image/*"}])
    png, webp = handler.handle(rows({"prompt": "a", "num_inference_steps": 2},
                                    {"prompt": "a", "num_inference_steps": 2,
                                     "output_format": "webp"}), context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [200, 200]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and context.get_response_content_type(0) == "image/png"
    assert webp[8:12] == b"WEBP" and context.get_response_content_type(1) == "image/webp"


def test_an_accept_naming_no_type_it_makes_gets_json(handler, unpacked):
    # docs/api.md: JSON, as without Accept (200, not 406), whatever the body's format.
    context = make_context(unpacked, [{"Accept": "image/gif"}, {"Accept": "text/html"}])
    bodies = handler.handle(rows({"prompt": "a", "num_inference_steps": 2,
                                  "output_format": "jpeg"},
                                 {"prompt": "a", "num_inference_steps": 2}), context)
    for index, body in enumerate(bodies):
        assert context.get_response_status(index)[0] == 200, body
        assert context.get_response_content_type(index) == "application/json"
        assert json.loads(body)["image"]


def test_a_wildcard_that_takes_json_at_a_higher_q_than_the_image_gets_json(handler, unpacked):
    # `*/*` and `application/*` match JSON (RFC 9110): counted for nothing, a client that
    # preferred anything over PNG got raw PNG bytes; a wildcard below the image keeps it.
    accepts = ["image/png;q=0.5, */*", "image/png;q=0.5, application/*", "image/png, */*;q=0.2"]
    context = make_context(unpacked, [{"Accept": accept} for accept in accepts])
    bodies = handler.handle(rows(*[{"prompt": "a", "seed": 1, "num_inference_steps": 2}] * 3),
                            context)
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    assert [context.get_response_content_type(i) for i in range(3)] == \
        ["application/json", "application/json", "image/png"]
    assert json.loads(bodies[0])["image"] and bodies[2][:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("body, field", [({"num_images": 2}, "num_images"),
                                         ({"stream": True}, "stream")])
def test_raw_image_bytes_are_refused_for_what_one_image_cannot_carry(handler, unpacked, body,
                                                                     field):
    # One body of PNG bytes holds one image, and no progress: the second image was dropped.
    context = make_context(unpacked, [{"Accept": "image/png"}])
    [reply] = handler.handle(rows({"prompt": "a", "num_inference_steps": 2, **body}), context)
    assert context.get_response_status(0)[0] == 400
    error = json.loads(reply)
    assert error["field"] == field and "raw image bytes" in error["message"], error


def test_streaming_sends_each_step_before_the_image(handler, unpacked):
    context = make_context(unpacked, [{}, {}])
    frontend, worker = socket.socketpair()
    context.cl_socket = worker
    try:
        bodies = handler.handle(rows({"prompt": "a", "num_inference_steps": 3, "stream": True},
                                     {"prompt": "b", "num_inference_steps": 3}), context)
        frontend.setblocking(False)
        sent = frontend.recv(1 << 20)
    finally:
        frontend.close()
        worker.close()
    positions = [sent.find(b'{"step": %d, "total": 3' % step) for step in (1, 2, 3)]
    assert -1 not in positions and positions == sorted(positions)
    assert sent.count(b'"step"') == 3  # only the streaming request got progress
    assert "image" in json.loads(bodies[0]) and "image" in json.loads(bodies[1])
    # The stream's last line ends with a newline as its steps do; a plain reply is as it was.
    assert bodies[0].endswith(b"}\n") and bodies[1].endswith(b"}")


def test_a_request_whose_cancel_flag_is_set_is_not_generated(handler, unpacked, tmp_path,
                                                              monkeypatch, caplog):
    """The job dispatcher's cancel channel: a flag file named by the request's
    X-Cancel-Token in the worker's cancel_dir stops its generation (here before its pipeline
    call: the flag was made while it queued); a token that could name a path is ignored."""
    token = "0123456789abcdef" * 2
    (tmp_path / token).touch()
    headers = [{"X-Cancel-Token": token}, {"X-Cancel-Token": f"../{tmp_path.name}/{token}"},
               {}]
    bodies = rows({"prompt": "a", "seed": 1, "num_inference_steps": 3},
                  {"prompt": "b", "seed": 2, "num_inference_steps": 2},
                  {"prompt": "c", "seed": 3, "num_inference_steps": 2})
    # Without a cancel directory the header means nothing: all three are generated.
    context = make_context(unpacked, headers)
    handler.handle(bodies, context)
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    assert (tmp_path / token).exists()

    monkeypatch.setattr(handler._handler, "cancel_dir", str(tmp_path))
    context = make_context(unpacked, headers)
    with caplog.at_level(logging.WARNING, logger="sdxl_serve.torchserve_handler"):
        replies = handler.handle(bodies, context)
    assert [context.get_response_status(i)[0] for i in range(3)] == [499, 200, 200]
    assert json.loads(replies[0])["type"] == "Cancelled"
    assert "X-Cancel-Token ignored" in caplog.text
    assert not (tmp_path / token).exists()  # removed with its batch


def test_a_form_post_is_told_to_send_json(handler, unpacked):
    context = make_context(unpacked, [{}])
    [body] = handler.handle([{'{"prompt": "x"}': b""}], context)
    assert context.get_response_status(0)[0] == 400
    assert "Content-Type: application/json" in json.loads(body)["message"]


def test_a_compressed_body_is_refused_naming_content_encoding(handler, unpacked):
    # TorchServe passes a body on as sent: gzipped, it was a 400 saying "byte 1 is not
    # valid UTF-8", and the client was not told its compression was the trouble.
    import gzip

    request = json.dumps({"prompt": "x", "num_inference_steps": 2}).encode()
    context = make_context(unpacked, [{"Content-Encoding": "gzip"},
                                      {"Content-Encoding": "identity"}])
    refused, served = handler.handle([{"body": gzip.compress(request)}, {"body": request}],
                                     context)
    assert context.get_response_status(0) == (415, "Unsupported Media Type")
    error = json.loads(refused)
    assert (error["field"], error["code"], error["type"]) == \
        ("Content-Encoding", 415, "UnsupportedMediaType")
    assert "'gzip'" in error["message"] and "uncompressed" in error["message"]
    assert context.get_response_status(1)[0] == 200 and json.loads(served)["image"]


def test_a_field_beside_a_multipart_forms_body_is_not_called_a_query_parameter(handler,
                                                                              unpacked):
    # `curl -F data=@request.json -F width=64`: TorchServe hands the form's parts over as
    # named values, the `data` one read as the body. The refusal of `width` said it "was sent
    # as a URL query parameter" to a client whose URL had none.
    context = make_context(unpacked, [{}])
    [body] = handler.handle([{"data": b'{"prompt": "x"}', "width": b"64"}], context)
    error = json.loads(body)
    assert (context.get_response_status(0)[0], error["field"]) == (400, "width")
    assert "a URL query parameter or a form field" in error["message"], error


def test_a_customized_describe_names_the_worker(handler, unpacked):
    # TorchServe's customized describe: one request, a `describe: True` header, no body.
    context = make_context(unpacked, [{"describe": "True"}])
    [body] = handler.handle([{}], context)
    answer = json.loads(body)
    assert answer["pid"] == os.getpid() and answer["model_version"] == "1.0"
    assert answer["engines_started"] >= 1 and answer["engine_pid"] != os.getpid()


def test_a_describe_header_inside_a_batch_is_an_ordinary_request(handler, unpacked):
    context = make_context(unpacked, [{"describe": "True"}, {}])
    bodies = handler.handle(rows({"prompt": "a", "num_inference_steps": 2},
                                 {"prompt": "b", "num_inference_steps": 2}), context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [200, 200]
    assert all("image" in json.loads(body) for body in bodies)


def test_a_clients_describe_header_alone_gets_its_image(handler, unpacked):
    # TorchServe forwards a client's headers: a prediction that carries `describe: True`
    # alone in its batch still has its body, so it is generated, not told the worker's pids.
    context = make_context(unpacked, [{"describe": "True"}])
    [body] = handler.handle(rows({"prompt": "a", "num_inference_steps": 2}), context)
    assert context.get_response_status(0)[0] == 200
    assert "image" in json.loads(body) and "pid" not in json.loads(body)


def test_a_deep_health_request_is_answered_with_the_check(handler, unpacked):
    context = make_context(unpacked, [{"X-Health-Check": "deep"}, {}])
    bodies = handler.handle(rows(b"", {"prompt": "a", "num_inference_steps": 2}), context)
    assert [context.get_response_status(i)[0] for i in range(2)] == [200, 200]
    assert json.loads(bodies[0])["status"] == "healthy"
    assert "image" in json.loads(bodies[1])


# How TorchServe 0.12's frontend parses a backend metric line (org.pytorch.serve.metrics.Metric).
METRIC_LINE = re.compile(r"\[METRICS\]([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)"
                         r"(\|#type:([^|,]+))?\|#hostname:([^,]+),([^,]+)(,(.*))?")


def test_our_metrics_reach_torchserve_as_metric_lines(handler, unpacked, caplog):
    context = make_context(unpacked, [{}, {}])
    # Earlier tests' batches may still be waiting to be written (metrics.DeferredSink holds
    # updates while batches come one after another): out before this batch.
    assert handler._handler.service.metrics.sink.flush(timeout=30)
    with caplog.at_level(logging.INFO):
        handler.handle(rows({"prompt": "a", "num_inference_steps": 2}, {"prompt": "b", "width": 7}),
                       context)
        # Written from a thread once the replies are out (metrics.DeferredSink).
        assert handler._handler.service.metrics.sink.flush(timeout=30)
    lines = [METRIC_LINE.fullmatch(r.getMessage()) for r in caplog.records
             if r.getMessage().startswith("[METRICS]sdxl_")]
    assert lines and all(lines)
    found = {(m.group(1), m.group(4), m.group(6)): float(m.group(3)) for m in lines}
    assert found[("sdxl_requests_total", "model_name:sdxl,model_version:1.0,outcome:ok",
                  "COUNTER")] == 1
    assert found[("sdxl_requests_total",
                  "model_name:sdxl,model_version:1.0,outcome:bad_request", "COUNTER")] == 1
    # Labelled by size: the request was at the model's native size, its warm-up size.
    assert found[("sdxl_generation_seconds_count", "model_name:sdxl,model_version:1.0,size:64x64",
                  "COUNTER")] == 1
    assert found[("sdxl_worker_requests", "model_name:sdxl,model_version:1.0,worker:"
                  + str(os.getpid()), "GAUGE")] >= 2
    assert not [m for m in found if m[0].startswith("sdxl_gpu_")]  # absent on CPU
