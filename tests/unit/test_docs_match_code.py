"""What README.md, k8s/README.md and docs/*.md tell users to type is true of the code.

Users copy commands, variables and settings from these pages: every relative link and
anchor resolves, every test named exists, every ``make`` target and script flag in a
command exists, every environment variable named is one something reads, every variable
the code reads is in a settings table, the settings tables hold every setting with its true
default, and a value stated for a key of config/ (`job_queue_size`, 16) is the one it ships.
The metric names are held by test_metrics.py (operations.md's table) and
tests/k8s/test_metric_names.py (the manifests).
"""

from __future__ import annotations

import ast
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from sdxl_jobs.processes import REWRITE_EVERY_S
from sdxl_jobs.settings import JobSettings, variable
from sdxl_serve.settings import Settings
from test_config import properties

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", REPO / "k8s" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_ROOMS = ("handler", "jobs", "scripts", "triton-models")
VARIABLE = re.compile(r"(?<![\w*])((?:SDXL|TS|REDIS)_[A-Z0-9_]*[A-Z0-9])\b")
# Where the code reads a variable (or sets one for TorchServe): the name, or a pattern with
# {name} for the families written as f-strings (TS_{api}_ADDRESS).
READ = re.compile(r"""(?:environ(?:\.get)?|getenv|env\.get|_setting|env:)\s*[\[(]?\s*"""
                  r"""(?:env,\s*)?f?["']?((?:SDXL|TS)_[A-Za-z0-9_{}]+)""")
SET_FOR_TORCHSERVE = re.compile(r"""["'](TS_[A-Z0-9_]+)["']\s*:""")
# Read or set by the code but for no user to set: the handler tells TorchServe's own Python
# in its worker not to decode requests; SDXL_JOBS_REDIS_URL is the variable that is *not*
# read (the settings module's docstring shows it ignored).
NOT_FOR_USERS = {"TS_DECODE_INPUT_REQUEST", "SDXL_JOBS_REDIS_URL"}


def prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def commands(page: Path) -> list[str]:
    """What a user copies: each inline code span, and each line of a fenced (backslash
    continuations joined) or indented code block."""
    text = page.read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    indented = re.findall(r"^(?: {4}|\t)(.+)$", prose(page), flags=re.M)
    spans = [span for _, span in re.findall(r"(`+)(.+?)(?<!`)\1(?!`)", prose(page), flags=re.S)]
    return lines + indented + spans


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of the page's headings: lower case, punctuation but - and _
    dropped, spaces to -, a repeated one suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set(re.findall(r'<a (?:name|id)="([^"]+)"', page.read_text()))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(page), flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)|(?:src|href)=\"([^\"]+)\"", prose(page)):
            link = target[0] or target[1]
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            linked = (page.parent / path) if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, broken


def test_a_heading_anchor_is_made_as_github_makes_it(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Where a prompt is kept (after its job ends)\n## `make serve`\n"
                    "## Logs\n## Logs\n```\n# not a heading\n```\n")
    assert anchors(page) == {"where-a-prompt-is-kept-after-its-job-ends", "make-serve",
                             "logs", "logs-1"}


def test_every_test_named_exists():
    defined: dict[str, set[str]] = {}
    for module in REPO.glob("tests/**/test_*.py"):
        names = {node.name for node in ast.walk(ast.parse(module.read_text()))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        defined[module.relative_to(REPO).as_posix()] = names
    every_name = set().union(*defined.values())
    missing = []
    for page in PAGES:
        text = page.read_text()
        for path, name in re.findall(r"((?:[\w/]+/)?test_\w+\.py)(?:::(\w+))?", text):
            modules = [m for m in defined if m == path or m.endswith("/" + path)]
            if not modules:
                missing.append(f"{page.name}: {path}")
            elif name and not any(name in defined[m] for m in modules):
                missing.append(f"{page.name}: {path}::{name}")
        # A bare name (`test_x`, not test_x.py nor a test_x_* family).
        for name in re.findall(r"(?<![\w./:])(test_\w+)(?![\w.*])", text):
            if name not in every_name:
                missing.append(f"{page.name}: {name}")
    assert not missing, missing


def test_every_make_target_in_a_command_exists():
    targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    unknown = {f"{page.name}: make {target}" for page in PAGES for command in commands(page)
               for target in re.findall(r"(?:^|[\s;&(])make ([a-z][\w-]*)", command)
               if target not in targets}
    assert not unknown, sorted(unknown)


def parser_source(script: Path) -> str:
    """The script's text and that of the package modules it imports, where a shared
    parser may add flags (``sdxl_jobs.settings.command_parser``: ``--redis``)."""
    text = script.read_text()
    for package, module in re.findall(r"from (sdxl_serve|sdxl_jobs)\.(\w+) import", text):
        imported = REPO / ("jobs" if package == "sdxl_jobs" else "handler") / package
        text += (imported / f"{module}.py").read_text()
    return text


def test_every_flag_in_a_command_is_the_scripts_or_modules():
    checked, unknown = set(), set()
    for page in PAGES:
        for command in commands(page):
            script = None
            for word in re.findall(r"[\w./-]+", command):
                if word.endswith(".py"):
                    named = REPO / "scripts" / Path(word).name
                    script = named if named.exists() else None
                elif re.fullmatch(r"sdxl_(?:serve|jobs)\.\w+", word):  # python -m ...
                    named = REPO / ("jobs" if word.startswith("sdxl_jobs") else "handler") / (
                        word.replace(".", "/") + ".py")
                    script = named if named.exists() else None
                elif script and re.fullmatch(r"--[a-z][\w-]*", word) and word != "--help":
                    checked.add((script.name, word))
                    if f'"{word}"' not in parser_source(script):
                        unknown.add(f"{page.name}: {script.name} {word}")
    assert {("generate.py", "--async"), ("bench.py", "--gpu"), ("health_probe.py", "--triton"),
            ("pod.py", "--settle"), ("keys.py", "--name")} <= checked
    assert not unknown, sorted(unknown)


def declared_markers() -> set[str]:
    """The markers setup.cfg declares (its ``markers =`` list, up to the next setting)."""
    listing = re.split(r"\n\S", (REPO / "setup.cfg").read_text().split("markers =", 1)[1], 1)[0]
    return set(re.findall(r"^\s+(\w+):", listing, flags=re.M))


def test_every_marker_named_is_declared():
    declared = declared_markers()
    named = {marker for page in PAGES
             for listing in re.findall(r"markers? ((?:`\w+`(?:, |; | and )?)+)", page.read_text())
             for marker in re.findall(r"`(\w+)`", listing)}
    assert {"unit", "jobs", "browser", "triton"} <= named
    assert named <= declared, named - declared


def marks(decorators: list[ast.expr]) -> set[str]:
    """The ``pytest.mark.<name>`` names among ``decorators`` (or a ``pytestmark`` value)."""
    return {node.attr for decorator in decorators for node in ast.walk(decorator)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "mark"}


def test_every_test_carries_a_tier_marker():
    # testing.md: `make test-unit` etc. run one tier each (`pytest -m unit`). A test module
    # without a tier marker ran under `make test` alone: tests/unit/test_server_env.py's 18
    # tests were in no `make test-<tier>` run.
    tiers = declared_markers()
    unmarked = []
    for module in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(module.read_text())
        of_module = marks([node.value for node in tree.body if isinstance(node, ast.Assign)
                           and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)])
        unmarked += [f"{module.relative_to(REPO)}::{node.name}" for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and node.name.startswith("test_")
                     and not (of_module | marks(node.decorator_list)) & tiers]
    assert not unmarked, unmarked


def variables_named(paths) -> dict[str, set[str]]:
    named: dict[str, set[str]] = {}
    for path in paths:
        for name in VARIABLE.findall(path.read_text() if path.is_file() else ""):
            named.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    return named


def test_every_variable_the_docs_name_is_read():
    # Read or set somewhere: the code, the tests (their own variables, testing.md), the
    # manifests, the image, the Makefile, config/ (log4j2.xml reads one).
    sources = [path for room in (*CODE_ROOMS, "tests", "k8s", "config")
               for path in (REPO / room).rglob("*")
               if path.is_file() and "__pycache__" not in path.parts]
    known = set(variables_named([*sources, REPO / "Dockerfile", REPO / "Makefile"]))
    known |= {"SDXL_" + field.name.upper() for field in fields(Settings)}
    known |= {variable(field.name) for field in fields(JobSettings)}
    unknown = {name: sorted(pages) for name, pages in variables_named(PAGES).items()
               if name not in known}
    assert not unknown, unknown


def read_by_the_code() -> set[str]:
    """Every SDXL_/TS_ variable the code reads (or sets for TorchServe), families as
    regular expressions."""
    names = {"SDXL_" + field.name.upper() for field in fields(Settings) if field.name != "extra"}
    names |= {variable(field.name) for field in fields(JobSettings)}
    for room in CODE_ROOMS + ("config",):
        for path in (REPO / room).rglob("*"):
            if path.suffix in (".py", ".xml", ".properties"):
                text = path.read_text()
                names |= set(READ.findall(text)) | set(SET_FOR_TORCHSERVE.findall(text))
    return names - NOT_FOR_USERS


def test_every_variable_the_code_reads_is_in_a_settings_table():
    read = read_by_the_code()
    # The scan finds what it is for: a setting's, a job setting's, a launcher's, a family.
    assert {"SDXL_MAX_NUM_IMAGES", "SDXL_JOBS_LEASE_S", "SDXL_REDIS_PORT", "SDXL_MODELS",
            "TS_{api}_ADDRESS", "SDXL_TRITON_{name}_PORT", "TS_GRPC_INFERENCE_PORT",
            "SDXL_CONSOLE_LOG_LEVEL"} <= read
    configuration = REPO / "docs" / "configuration.md"
    rows = [*table(configuration, "## Handler settings"),
            *table(configuration, "## Other variables"),
            *table(REPO / "docs" / "jobs.md", "### Settings")]
    # The variable is in a row's first cell (the handler settings': its second).
    named = {name for row in rows for name in VARIABLE.findall(" ".join(row[:2]))}
    unnamed = sorted(name for name in read if not any(
        re.fullmatch(re.sub(r"\{\w+\}", "[A-Z]+", name), doc) for doc in named))
    assert not unnamed, f"read by the code, in no settings table: {unnamed}"


def table(page: Path, heading: str) -> list[list[str]]:
    """The rows (cells, backticks kept) of the first table after ``heading``."""
    text = page.read_text().split(heading + "\n", 1)[1]
    rows = re.search(r"^\|.*?(?=\n\n|\n#|\Z)", text, flags=re.S | re.M).group(0)
    return [[cell.strip() for cell in row.strip("|").split(" | ")]
            for row in rows.splitlines()[2:]]


def listed(cell: str) -> list[str]:
    """`a`, `b` -> [a, b]; a default cell's words outside backticks stay as they are."""
    return [item.strip().strip("`") for item in re.split(r",\s+(?![^(]*\))", cell)]


def test_the_configuration_table_holds_every_handler_setting_with_its_default():
    declared = {field.name: field for field in fields(Settings) if field.name != "extra"}
    rows = {}
    for names, variables, defaults, _ in table(REPO / "docs" / "configuration.md",
                                              "## Handler settings"):
        assert len(listed(names)) == len(listed(variables)) == len(listed(defaults)), names
        for name, variable_name, default in zip(listed(names), listed(variables),
                                                listed(defaults)):
            rows[name] = (variable_name, default)
    assert rows.keys() == declared.keys()
    wrong = {}
    for name, (variable_name, default) in rows.items():
        field = declared[name]
        true_default = field.default if field.default is not MISSING else field.default_factory()
        if default == '""':
            # An empty override is not read: say so rather than parse it.
            parsed = "" if isinstance(true_default, str) else ()
        else:
            # The default as a user would type it, read by the worker's own parser.
            parsed = getattr(Settings.from_mapping({}, env={variable_name: default}), name)
        if variable_name != "SDXL_" + name.upper() or parsed != true_default:
            wrong[name] = (variable_name, default, true_default)
    assert not wrong, wrong


def test_the_jobs_settings_table_holds_every_job_setting_with_its_default():
    rows = {}
    for variables, defaults, _ in table(REPO / "docs" / "jobs.md", "### Settings"):
        for variable_name, default in zip(listed(variables), listed(defaults), strict=True):
            rows[variable_name] = re.sub(r"\s*\(.*\)$", "", default).strip("`")
    wrong = {}
    for field in fields(JobSettings):
        name = variable(field.name)
        if name not in rows:
            wrong[name] = "not in the table"
            continue
        typed = "" if rows[name] == "none" else rows[name]
        parsed = getattr(JobSettings.from_env({name: typed}), field.name)
        if parsed != field.default:
            wrong[name] = (rows[name], field.default)
    assert not wrong, wrong
    # The launcher's own, beside them.
    assert float(rows["SDXL_REDIS_REWRITE_S"]) == REWRITE_EVERY_S


# A value a page states for a shipped key, with its unit: `max_request_size` (1 MiB).
STATED = re.compile(r"`(\w+)`(?:,| is| of)? \(?(\d+)\s*(s|ms|minutes|MiB|requests)\b")
UNIT = {"s": 1, "ms": 1, "minutes": 1, "MiB": 1 << 20, "requests": 1}


def test_the_config_values_the_docs_state_are_what_config_ships():
    model_config = yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())
    shipped = {**properties(), **{key: value for key, value in model_config.items()
                                  if key != "handler"}}
    stated, wrong = set(), []
    for page in PAGES:
        for key, number, unit in STATED.findall(page.read_text()):
            if key in shipped:
                stated.add(key)
                if int(number) * UNIT[unit] != int(shipped[key]):
                    wrong.append(f"{page.name}: `{key}` {number} {unit}, ships {shipped[key]}")
    assert {"max_request_size", "max_response_size", "job_queue_size", "token_expiration_min",
            "responseTimeout", "startupTimeout", "maxBatchDelay"} <= stated
    assert not wrong, wrong


# A curl command (not the word in prose) up to the end of its line or the pipe its answer
# goes to; and what puts a key there: the header, or a variable holding the key.
CURL_COMMAND = re.compile(r"\bcurl -[^|\n]*")
KEY_IN_ARGUMENTS = re.compile(r"(?i:authorization|bearer)|\$\{?\w*(?:KEY|TOKEN)")


def test_no_curl_line_takes_a_key_in_its_arguments():
    """A key in curl's arguments is one every user of the machine reads (`ps`) while the
    call runs: each curl line users copy, from the pages or as `make serve` and `make
    serve-jobs` print them, has curl read the header from its standard input (`-H @-`,
    security.md). They passed `-H "Authorization: Bearer $(cat ...)"`."""
    from serve import ready_lines
    from serve_jobs import curl_lines

    from sdxl_serve.server import Addresses

    printed = (ready_lines(Addresses.from_env({}), Path("build/run/8080"), "sdxl") + "\n"
               + curl_lines("http://127.0.0.1:8090", Path("build/run/jobs/api-key")))
    texts = {page.name: page.read_text() for page in PAGES} | {"printed": printed}
    keyed, wrong = 0, []
    for name, text in texts.items():
        for command in CURL_COMMAND.findall(text.replace("\\\n", " ")):
            keyed += "-H @-" in command
            wrong += [f"{name}: {command}"] * bool(KEY_IN_ARGUMENTS.search(command))
    assert not wrong, wrong
    assert keyed >= 15, keyed  # README, api, jobs, rollouts and the printed lines
