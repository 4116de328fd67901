"""LoadWatch reads a failed model load out of TorchServe's logs (lines in 0.12's format)."""

from __future__ import annotations

import pytest

from sdxl_serve.server import LoadWatch

pytestmark = pytest.mark.unit

PREFIX = "2026-11-30T12:24:44,989 [INFO ] W-9000-sdxl_1.0-stdout MODEL_LOG - "
TRACEBACK = ["Traceback (most recent call last):",
             '  File "/x/ts/model_loader.py", line 143, in load',
             "    initialize_fn(service.context)",
             "sdxl_serve.engine.ModelLoadError: /w does not match its manifest:",
             "  unet/x.safetensors: sha256 ab..., the manifest says cd..."]
FAILED = ("2026-11-30T12:24:45,065 [WARN ] W-9000-sdxl_1.0 org.pytorch.serve.wlm."
          "BatchAggregator - Load model failed: sdxl, error: Worker died.\n")


def write(path, lines):
    with open(path, "a") as log:
        log.writelines(lines)


def test_nothing_failed_is_none(tmp_path):
    watch = LoadWatch(tmp_path)
    assert watch.failure("sdxl", settle_s=0) is None
    write(tmp_path / "ts_log.log", ["... Setting default version to 1.0 for model sdxl\n"])
    assert watch.failure("sdxl", settle_s=0) is None


def test_a_failed_load_gives_the_workers_exception(tmp_path):
    watch = LoadWatch(tmp_path)
    write(tmp_path / "model_log.log", [PREFIX + "Backend worker process died.\n"]
          + [PREFIX + line + "\n" for line in TRACEBACK]
          + [PREFIX + "s_name_part0=/x/.ts.sock, pid=2\n"])
    write(tmp_path / "ts_log.log", [FAILED])
    assert watch.failure("sdxl") == "\n".join(TRACEBACK)
    assert watch.failure("sdxl/1.0") == "\n".join(TRACEBACK)
    assert watch.failure(None) == "\n".join(TRACEBACK)
    assert watch.failure("other", settle_s=0) is None


@pytest.mark.parametrize("model", ["sdxl", "sdxl_b1"])
def test_a_worker_that_errs_before_its_model_loaded_is_a_failed_load(tmp_path, model):
    # A load error the worker catches and answers with 500: no "Load model failed" line,
    # only the worker thread's state change.
    watch = LoadWatch(tmp_path)
    write(tmp_path / "ts_log.log", [
        f"2026-11-30T12:46:21,458 [DEBUG] W-9000-{model}_1.0 org.pytorch.serve.wlm."
        f"WorkerThread - W-9000-{model}_1.0 State change WORKER_STARTED -> WORKER_ERROR\n"])
    write(tmp_path / "model_log.log", [PREFIX + line + "\n" for line in TRACEBACK])
    assert watch.failure(model) == "\n".join(TRACEBACK)
    assert watch.failure("other", settle_s=0) is None


def test_a_failed_load_of_a_version_with_an_underscore_is_seen(tmp_path):
    # `make serve VERSION=2_0` with a load the worker catches: the thread W-9000-sdxl_2_0,
    # read apart at its last `_`, named model `sdxl_2`, and the start waited out its
    # 900 s timeout where VERSION=2.0 failed in seconds.
    watch = LoadWatch(tmp_path)
    write(tmp_path / "ts_log.log", [
        "2026-11-30T12:46:21,458 [DEBUG] W-9000-sdxl_2_0 org.pytorch.serve.wlm."
        "WorkerThread - W-9000-sdxl_2_0 State change WORKER_STARTED -> WORKER_ERROR\n"])
    write(tmp_path / "model_log.log",
          [PREFIX.replace("sdxl_1.0", "sdxl_2_0") + line + "\n" for line in TRACEBACK])
    assert watch.failure("sdxl/2_0") == "\n".join(TRACEBACK)
    assert watch.failure("sdxl/2", settle_s=0) is None
    assert watch.failure("sdxl/1.0", settle_s=0) is None


@pytest.mark.parametrize("states", [
    # It loaded, then died: TorchServe restarts it, not a failed load.
    ("WORKER_STARTED -> WORKER_MODEL_LOADED", "WORKER_MODEL_LOADED -> WORKER_STOPPED"),
    # Scaled down (an unregister, a scale to 0) while it started: TorchServe keeps the
    # state WORKER_SCALED_DOWN and logs the stop from there.
    ("null -> WORKER_SCALED_DOWN", "WORKER_SCALED_DOWN -> WORKER_STOPPED"),
], ids=["loaded-then-died", "stopped-on-purpose"])
def test_a_worker_stop_that_is_no_failed_load(tmp_path, states):
    watch = LoadWatch(tmp_path)
    write(tmp_path / "ts_log.log", [f"... W-9000-sdxl_1.0 State change {change}\n"
                                    for change in states])
    assert watch.failure("sdxl", settle_s=0) is None


def test_every_traceback_of_the_last_worker_is_given(tmp_path):
    # The handler's error, then TorchServe's own RuntimeError after catching it; a worker
    # started before this one printed another.
    caught = ["Traceback (most recent call last):", '  File "/x/ts/model_service_worker.py"',
              "RuntimeError: 500 - Unknown exception"]
    watch = LoadWatch(tmp_path)
    write(tmp_path / "model_log.log",
          [PREFIX + line + "\n" for line in ["Torch worker started.", *TRACEBACK[:3],
                                             "OldError: from the worker before"]]
          + [PREFIX + line + "\n" for line in ["Torch worker started.", *TRACEBACK,
                                             "Failed to load model sdxl", *caught]])
    write(tmp_path / "ts_log.log", [FAILED])
    # TorchServe's own report after the cause is left out: it said nothing the cause does not.
    assert watch.failure("sdxl") == "\n".join(TRACEBACK)


def test_without_a_traceback_the_frontends_line_is_given(tmp_path):
    watch = LoadWatch(tmp_path)
    write(tmp_path / "ts_log.log", [FAILED])
    assert watch.failure("sdxl", settle_s=0) == "Load model failed: sdxl, error: Worker died."


def test_lines_of_earlier_runs_do_not_count(tmp_path):
    # A run directory is reused by `make serve`: its logs keep the last run's failure.
    write(tmp_path / "ts_log.log", [FAILED])
    write(tmp_path / "model_log.log", [PREFIX + line + "\n" for line in TRACEBACK])
    watch = LoadWatch(tmp_path)
    assert watch.failure("sdxl", settle_s=0) is None
    write(tmp_path / "ts_log.log", [FAILED])
    assert watch.failure("sdxl", settle_s=0) == \
        "Load model failed: sdxl, error: Worker died."


def test_a_watch_of_one_version_reads_only_its_workers(tmp_path):
    # A rollout loads 2.0 while 1.0 keeps serving into the same logs: 1.0's lines between
    # 2.0's traceback lines are not part of it, and 2.0's failure is not 1.0's.
    new = "2026-11-30T12:24:44,990 [INFO ] W-9001-sdxl_2.0-stdout MODEL_LOG - "
    watch = LoadWatch(tmp_path)
    write(tmp_path / "model_log.log",
          [new + "Torch worker started.\n", new + TRACEBACK[0] + "\n",
           PREFIX + "Backend received inference at: 1764505484\n"]
          + [new + line + "\n" for line in TRACEBACK[1:]])
    write(tmp_path / "ts_log.log", [FAILED.replace("sdxl_1.0", "sdxl_2.0")])
    assert watch.failure("sdxl/2.0") == "\n".join(TRACEBACK)
    assert watch.failure("sdxl/1.0", settle_s=0) is None
    assert watch.failure("sdxl_b1/2.0", settle_s=0) is None
    assert watch.failure("sdxl") is not None  # the model's name alone: any version


# A worker process that died before "Torch worker started.", as TorchServe 0.12 logged it
# when the worker could not read its metrics config (TS_METRICS_CONFIG naming a missing
# file): the frontend never sent the model, so there is no "Load model failed" line.
METRICS_CONFIG_GONE = [
    "Backend worker process died.",
    "Traceback (most recent call last):",
    '  File "/x/ts/metrics/metric_cache_yaml_impl.py", line 39, in _parse_yaml_file',
    '    open(config_file_path, "r", encoding="utf-8")',
    "FileNotFoundError: [Errno 2] No such file or directory: '/x/metrics.yaml'",
    "",
    "During handling of the above exception, another exception occurred:",
    "",
    "Traceback (most recent call last):",
    '  File "/x/ts/model_service_worker.py", line 298, in <module>',
    "    worker = TorchModelServiceWorker(",
    "             ^^^^^^^^^^^^^^^^^^^^^^^^",
    "ts.metrics.metric_cache_errors.MetricsCacheIOError: Error reading file: Error reading "
    "file /x/metrics.yaml: [Errno 2] No such file or directory: '/x/metrics.yaml'"]
STREAM_CLOSED = [
    "2026-12-01T22:08:46,900 [ERROR] W-9000-sdxl_1.0 org.pytorch.serve.wlm.WorkerThread - "
    "Backend worker error\n",
    "org.pytorch.serve.wlm.WorkerInitializationException: Backend stream closed.\n",
    "\tat org.pytorch.serve.wlm.WorkerLifeCycle.startWorkerPython(WorkerLifeCycle.java:204) "
    "~[model-server.jar:?]\n"]


def stopped(old_state: str, version: str = "1.0") -> str:
    return (f"2026-12-01T22:08:46,902 [DEBUG] W-9000-sdxl_{version} org.pytorch.serve.wlm."
            f"WorkerThread - W-9000-sdxl_{version} State change {old_state} -> WORKER_STOPPED\n")


def test_a_worker_that_died_before_it_started_is_a_failed_load(tmp_path):
    watch = LoadWatch(tmp_path)
    # The first process, then a retry that died the same way.
    for old_state in ("null", "WORKER_STOPPED"):
        write(tmp_path / "model_log.log", [PREFIX + line + "\n" for line in METRICS_CONFIG_GONE])
        write(tmp_path / "ts_log.log", [*STREAM_CLOSED, stopped(old_state)])
        # Both tracebacks of the chained exception, each once however often it was retried.
        assert watch.failure("sdxl") == ("\n".join(METRICS_CONFIG_GONE[1:5]) + "\n\n"
                                         + "\n".join(METRICS_CONFIG_GONE[8:]))
        assert watch.failure("sdxl/1.0") == watch.failure("sdxl")
        assert watch.failure("sdxl/2.0", settle_s=0) is None
        assert watch.failure("other", settle_s=0) is None


def test_a_worker_that_failed_at_import_gives_its_stderr(tmp_path):
    # An exception before the worker's own logging is set up goes to its stderr.
    stderr = "2026-12-01T22:10:00,041 [WARN ] W-9000-sdxl_1.0-stderr MODEL_LOG - "
    exception = ["Traceback (most recent call last):",
                 '  File "/x/ts/model_service_worker.py", line 24, in <module>',
                 '    LOCAL_RANK = int(os.getenv("LOCAL_RANK", 0))',
                 "ValueError: invalid literal for int() with base 10: 'x'"]
    watch = LoadWatch(tmp_path)
    write(tmp_path / "model_log.log", [stderr + line + "\n" for line in exception])
    write(tmp_path / "ts_log.log", [*STREAM_CLOSED, stopped("null")])
    assert watch.failure("sdxl/1.0") == "\n".join(exception)


def test_a_traceback_on_stderr_is_read_whole_between_stdout_lines(tmp_path):
    # Our errors go to the worker's stderr (the engine's failed load, with its traceback),
    # TorchServe's to stdout, each copied by a thread of its own: lines of one can land
    # between those of the other.
    stderr = "2026-12-04T16:34:11,812 [WARN ] W-9000-sdxl_1.0-stderr MODEL_LOG - "
    caught = ["Traceback (most recent call last):", '  File "/x/ts/model_service_worker.py"',
              "RuntimeError: 500 - Unknown exception"]
    watch = LoadWatch(tmp_path)
    write(tmp_path / "model_log.log",
          [PREFIX + "Torch worker started.\n", stderr + TRACEBACK[0] + "\n",
           PREFIX + "Failed to load model sdxl\n", PREFIX + caught[0] + "\n",
           *[stderr + line + "\n" for line in TRACEBACK[1:]],
           *[PREFIX + line + "\n" for line in caught[1:]]])
    write(tmp_path / "ts_log.log", [FAILED])
    assert watch.failure("sdxl/1.0") == "\n".join(TRACEBACK)


def test_torchserves_out_of_memory_guess_does_not_end_a_load_failure_that_says_cuda(tmp_path):
    """TorchServe's worker answers any failed load whose message says CUDA with 507 "System
    out of memory": `device: cuda` on a node whose torch sees no GPU ended `make serve`'s
    error (and the pod's) with that line. Alone, without the cause, it is still given."""
    cause = ["Traceback (most recent call last):", '  File "/x/ts/model_loader.py"',
             "sdxl_serve.engine_process.EngineProcessError: the engine process could not "
             "load the model: ModelLoadError: setting device=cuda, but torch sees no CUDA "
             "device"]
    caught = ["Traceback (most recent call last):", '  File "/x/ts/model_service_worker.py"',
              '    raise RuntimeError("{} - {}".format(code, result))',
              "RuntimeError: 507 - System out of memory"]
    watch = LoadWatch(tmp_path)
    write(tmp_path / "model_log.log",
          [PREFIX + line + "\n" for line in ["Torch worker started.", *cause, *caught]])
    write(tmp_path / "ts_log.log", [FAILED])
    assert watch.failure("sdxl") == "\n".join(cause)
    alone = LoadWatch(tmp_path / "alone")
    (tmp_path / "alone").mkdir()
    write(tmp_path / "alone" / "model_log.log",
          [PREFIX + line + "\n" for line in ["Torch worker started.", *caught]])
    write(tmp_path / "alone" / "ts_log.log", [FAILED])
    assert alone.failure("sdxl") == "\n".join(caught)


def thread_line(time: str, thread: str, text: str, level: str = "DEBUG") -> str:
    """A line of TorchServe's WorkerThread in ts_log.log, written on ``thread``."""
    return (f"2026-12-07T11:40:{time} [{level:<5}] {thread} "
            f"org.pytorch.serve.wlm.WorkerThread - {text}\n")


# A failed load of 8.1 scaled down during its retry's back-off: ts_log.log as TorchServe 0.12
# wrote it in tests/e2e/test_rollout.py, each line whole.
FAILED_LOAD = [
    thread_line("01,055", "W-9008-sdxl_8.1",
                "W-9008-sdxl_8.1 State change null -> WORKER_STARTED"),
    thread_line("01,127", "W-9008-sdxl_8.1",
                "W-9008-sdxl_8.1 State change WORKER_STARTED -> WORKER_ERROR"),
    thread_line("01,151", "W-9008-sdxl_8.1",
                "W-9008-sdxl_8.1 State change WORKER_ERROR -> WORKER_STOPPED"),
]
RETRY = thread_line("01,152", "W-9008-sdxl_8.1", "Retry worker: 9008 in 1 seconds.", "INFO")
SCALED_DOWN = thread_line("01,190", "epollEventLoopGroup-3-2",
                          "W-9008-sdxl_8.1 State change WORKER_STOPPED -> WORKER_SCALED_DOWN")
RETRIED = thread_line("03,172", "W-9008-sdxl_8.1",
                      "W-9008-sdxl_8.1 State change WORKER_SCALED_DOWN -> WORKER_STARTED")
RETRY_ENDED = [
    thread_line("03,230", "W-9008-sdxl_8.1",
                "W-9008-sdxl_8.1 State change WORKER_SCALED_DOWN -> WORKER_ERROR"),
    thread_line("03,231", "W-9008-sdxl_8.1",
                "W-9008-sdxl_8.1 State change WORKER_SCALED_DOWN -> WORKER_STOPPED"),
    thread_line("03,231", "W-9008-sdxl_8.1", "Worker terminated due to scale-down call."),
]


def test_a_retry_planned_before_a_scale_down_runs_unlisted_until_its_load_ends(tmp_path):
    watch, log = LoadWatch(tmp_path), tmp_path / "ts_log.log"
    write(log, FAILED_LOAD)
    assert watch.unlisted_retries("sdxl/8.1") == {}
    write(log, [RETRY])  # listed still: a retry like any other
    assert watch.unlisted_retries("sdxl/8.1") == {}
    write(log, [SCALED_DOWN])
    assert watch.unlisted_retries("sdxl/8.1") == {"W-9008": "planned"}
    assert watch.unlisted_retries("sdxl/8") == {} == watch.unlisted_retries("other/8.1")
    write(log, [RETRIED])
    assert watch.unlisted_retries("sdxl/8.1") == {"W-9008": "loading"}
    write(log, RETRY_ENDED)
    assert watch.unlisted_retries("sdxl/8.1") == {}


def test_a_retry_planned_as_the_scale_down_came_counts_in_either_order(tmp_path):
    # The worker's thread plans it while the scale-down marks the worker: either line may
    # be written first.
    watch, log = LoadWatch(tmp_path), tmp_path / "ts_log.log"
    write(log, FAILED_LOAD + [SCALED_DOWN, RETRY])
    assert watch.unlisted_retries("sdxl/8.1") == {"W-9008": "planned"}


def test_an_unlisted_retry_that_loads_is_left_loaded(tmp_path):
    watch, log = LoadWatch(tmp_path), tmp_path / "ts_log.log"
    write(log, FAILED_LOAD + [RETRY, SCALED_DOWN, RETRIED, thread_line(
        "05,000", "W-9008-sdxl_8.1",
        "W-9008-sdxl_8.1 State change WORKER_SCALED_DOWN -> WORKER_MODEL_LOADED")])
    assert watch.unlisted_retries("sdxl/8.1") == {"W-9008": "loaded"}
    # Its process ended by a SIGTERM (what the rollout sends it): TorchServe starts none.
    write(log, [thread_line("09,000", "epollEventLoopGroup-5-1",
                            "9008 Worker disconnected. WORKER_SCALED_DOWN", "INFO"),
                thread_line("09,001", "W-9008-sdxl_8.1",
                            "W-9008-sdxl_8.1 State change WORKER_SCALED_DOWN -> WORKER_STOPPED"),
                thread_line("09,001", "W-9008-sdxl_8.1",
                            "Worker terminated due to scale-down call.")])
    assert watch.unlisted_retries("sdxl/8.1") == {}


def test_a_workers_pid_is_its_last_process_since_the_watch_began(tmp_path):
    log = tmp_path / "model_log.log"

    def pid_line(thread: str, pid: int) -> str:
        return f"2026-12-07T11:40:01,000 [INFO ] {thread}-stdout MODEL_LOG - [PID]{pid}\n"

    write(log, [pid_line("W-9008-sdxl_8.1", 100)])  # an earlier run's
    watch = LoadWatch(tmp_path)
    assert watch.worker_pid("sdxl/8.1", "W-9008") is None
    write(log, [pid_line("W-9008-sdxl_8.1", 200), pid_line("W-9009-sdxl_8.1", 300),
                pid_line("W-9008-sdxl_8.10", 400), pid_line("W-9008-sdxl_8.1", 201)])
    assert watch.worker_pid("sdxl/8.1", "W-9008") == 201
    assert watch.worker_pid("sdxl/8.1", "W-9009") == 300
    assert watch.worker_pid("sdxl/8.1", "W-9000") is None


@pytest.mark.parametrize("lines", [
    # Scaled down before its thread planned a retry: the thread sees it and plans none.
    FAILED_LOAD + [SCALED_DOWN, thread_line(
        "01,191", "W-9008-sdxl_8.1", "Worker terminated due to scale-down call.")],
    # A retry that ran while the worker was listed, then a scale-down of a loaded worker.
    FAILED_LOAD + [RETRY, thread_line(
        "02,200", "W-9008-sdxl_8.1",
        "W-9008-sdxl_8.1 State change WORKER_STOPPED -> WORKER_STARTED"), thread_line(
        "04,000", "W-9008-sdxl_8.1",
        "W-9008-sdxl_8.1 State change WORKER_STARTED -> WORKER_MODEL_LOADED"), thread_line(
        "09,000", "epollEventLoopGroup-3-2",
        "W-9008-sdxl_8.1 State change WORKER_MODEL_LOADED -> WORKER_SCALED_DOWN")],
])
def test_a_scale_down_with_no_retry_planned_leaves_none(tmp_path, lines):
    watch = LoadWatch(tmp_path)
    write(tmp_path / "ts_log.log", lines)
    assert watch.unlisted_retries("sdxl/8.1") == {}
