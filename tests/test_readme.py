"""The README walked as written: every command and code block of README.md and deploy/README.md runs.

Why: a new user's first hour is the README. A block that no longer runs (a renamed flag, an undefined name
in a snippet, an output left in the checkout) is found here, in CI, instead of by that user.

How the walk works:

- Blocks are the fenced ```bash / ```sh / ```console (commands) and ```python blocks, in document order.
  Each bash block is one ``bash`` script (``set -eo pipefail``, traced); each python block is one file run
  with ``python``. Both run in a temporary copy of the repository (the tracked and not-ignored files, made a
  git repository of its own), beside a link to ``../shared`` when that exists, so ``../shared/data`` paths
  resolve and nothing lands in the checkout. ``PATH`` starts with this venv's ``bin``: ``fedrecon`` and
  ``python`` are the project as installed for the tests.
- After the walk ``git status --porcelain`` of the copy must be empty: every output of the README's
  commands lands in a git-ignored place, so running them in a checkout leaves it clean.
- A ``fedrecon serve`` line runs in the background (output to a log) and the walk waits, up to 90 s, until
  its ``--port`` accepts connections (or fails at once, with the log, if it exits). Servers run until the
  end of their document's walk, then get SIGTERM and must exit 0 within 90 s.
- Ports 50051-50059 in a document are replaced by free ports (one per number, consistently within the
  document), so walks never collide with each other or with a real coordinator.
- ``make TARGET`` runs with this venv (``make -o setup TARGET VENV=<venv>``): no second environment is built.
- ``/var/lib/fedrecon`` (deploy/README's store folder) is replaced by a temporary folder.
- Quick switch, ``FEDRECON_README_QUICK`` (default ``1`` here; ``0`` runs the commands at full length):
  ``fedrecon simulate`` runs at most 3 rounds (``--rounds 3`` added or lowered) and at most 2 centralized
  epochs, ``make simulate`` gets ``ROUNDS=3``, and ``fedrecon client`` takes part in one round
  (``--rounds 1``: a round of 100 MovieLens clients costs the walk about 10 s on two busy cores). Nothing
  else is shortened.
- Markers, an HTML comment on the line before a block's opening fence:
  ``<!-- readme-test: skip (reason) -->`` for a block that cannot run in a test (at most 5 over both
  documents; each shows as a SKIPPED line with its reason), and
  ``<!-- readme-test: pending issue-N (reason) -->`` for a block documenting behaviour being built now: it
  runs in its place, as an xfail that is not strict, so the marker can go once the behaviour is merged.
  Pending blocks must be leaves: no later block may depend on what they make.
- A block naming ``../shared/data`` needs that data and a ``--backend tff`` / ``make tff-env`` block the
  TFF environment (``.venv-tff`` or ``$FEDRECON_TFF_PYTHON``): skipped when absent, failures under CI
  (``FEDRECON_REQUIRE_ALL=1``), as everywhere in the suite.

The walk's tests are marked ``readme``: ``pytest -m "not readme"`` leaves it out of a quick local run;
``make test`` and CI run it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "deploy/README.md")
SHARED = REPO.parent / "shared"
ML_2998 = SHARED / "data" / "movielens" / "ml-1m-2998u"
VENV = Path(sys.prefix)
QUICK = os.environ.get("FEDRECON_README_QUICK", "1") == "1"
QUICK_ROUNDS = 3
QUICK_CENTRALIZED_EPOCHS = 2
QUICK_CLIENT_ROUNDS = 1
MAX_SKIPS = 8  # the suite itself, the TFF path, and six long benchmarks (each run small by test_benchmarks)
BLOCK_TIMEOUT_S = 900
SERVE_READY_S = 90
SERVE_STOP_S = 90

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|pending\s+[\w-]+)\s*\((.+)\)\s*-->\s*$")
RUNNABLE = {"bash": "bash", "sh": "bash", "console": "bash", "python": "python"}


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    kind: str  # "bash" or "python"
    text: str
    marker: str | None = None  # "skip" or "pending issue-N"
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def needs_data(self) -> bool:
        return "../shared/data" in self.text

    @property
    def needs_tff(self) -> bool:
        return "--backend tff" in self.text or "make tff-env" in self.text


def read_blocks(document: str) -> list[Block]:
    """The runnable fenced blocks of ``document``, each with the marker on the line before its fence."""
    lines = (REPO / document).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        kind = RUNNABLE.get(opening.group(1))
        if kind is not None:
            found = MARKER.match(lines[i - 1].strip()) if i > 0 else None
            blocks.append(Block(document, i + 1, kind, "\n".join(lines[i + 1:end]) + "\n",
                                " ".join(found.group(1).split()) if found else None,
                                found.group(2) if found else ""))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for document in DOCUMENTS for block in read_blocks(document)]


# ----- rewriting a block for the walk ---------------------------------------------------------------------
def _split_comment(line: str) -> tuple[str, str]:
    """``line`` as (command, trailing ``# comment``), honouring quotes."""
    quote = ""
    for k, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), " " + line[k:]
    return line.rstrip(), ""


def _quick(command: str) -> str:
    """The quick switch's rule (module docstring) applied to one command."""
    def lower(match: re.Match[str]) -> str:
        return f"--rounds {min(int(match.group(1)), QUICK_ROUNDS)}"

    if not command.lstrip().startswith("fedrecon ") or "--help" in command:
        return command
    if command.split()[1] == "client":
        return re.sub(r"--rounds[ =](\d+)", f"--rounds {QUICK_CLIENT_ROUNDS}", command)
    command = re.sub(r"--rounds[ =](\d+)", lower, command)
    if command.split()[1] == "simulate":
        if "--rounds" not in command:
            command += f" --rounds {QUICK_ROUNDS}"
        if "centralized" in command and "--centralized-epochs" not in command:
            command += f" --centralized-epochs {QUICK_CENTRALIZED_EPOCHS}"
    return command


def rewrite_command(command: str) -> str:
    """One logical command line (continuations joined) as the walk runs it."""
    indent = command[:len(command) - len(command.lstrip())]
    words = command.split()
    if not words:
        return command
    if words[0] == "make":
        extra = f" -o setup VENV={VENV}"
        if QUICK and "simulate" in words[1:]:
            extra += f" ROUNDS={QUICK_ROUNDS}"
        return f"{indent}make{extra} {' '.join(words[1:])}"
    if QUICK:
        command = _quick(command)
    if words[:2] == ["fedrecon", "serve"]:
        port = re.search(r"--port[ =](\d+)", command)
        assert port, f"a README serve line must name its --port: {command.strip()}"
        return f"{indent}__readme_serve {port.group(1)} {command.lstrip()}"
    return command


def logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\") and not line.lstrip().startswith("#"):
            pending = line.rstrip()[:-1].rstrip() + " "
            continue
        pending = ""
        yield line
    if pending:
        yield pending


BASH_PRELUDE = r"""set -eo pipefail
PS4='+ [${SECONDS}s] readme$ '
# A README serve line: in the background (output to a log), then wait until its port accepts connections.
__readme_serve() {
  { set +x; } 2>/dev/null
  local port=$1; shift
  local log="$READMEWALK_LOGS/serve-$port.log"
  ( "$@" & child=$!; echo "$child $port" >>"$READMEWALK_LOGS/servers"; wait "$child";
    echo $? >"$READMEWALK_LOGS/serve-$child.rc" ) >"$log" 2>&1 </dev/null &
  local deadline=$((SECONDS + READMEWALK_READY_S))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if ! kill -0 "$!" 2>/dev/null || ((SECONDS > deadline)); then
      echo "readme-test: 'fedrecon serve' on port $port did not come up; its log:" >&2; cat "$log" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "readme-test: serve listening on port $port" >&2
  set -x
}
set -x
"""


def bash_script(block: Block, ports: dict[str, str], var_lib: Path) -> str:
    text = substitute(block.text, ports, var_lib)
    body = []
    for line in logical_lines(text):
        command, comment = _split_comment(line)
        body.append(rewrite_command(command) + comment)
    return BASH_PRELUDE + "\n".join(body) + "\n"


def substitute(text: str, ports: dict[str, str], var_lib: Path) -> str:
    text = re.sub(r"\b5005\d\b", lambda m: ports[m.group(0)], text)
    return text.replace("/var/lib/fedrecon", str(var_lib))


# ----- the walk -------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    ok: bool
    seconds: float
    output: str


@dataclass
class Walk:
    root: Path
    copy: Path
    logs: Path
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    server_exits: dict[str, int | None] = field(default_factory=dict)  # which serve -> its exit code
    stopped: set[str] = field(default_factory=set)  # pids already sent SIGTERM


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _copy_repository(target: Path) -> None:
    """The checkout's tracked and not-ignored files, committed into a git repository of their own."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    git = ["git", "-c", "user.name=readme-test", "-c", "user.email=readme-test@localhost",
           "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=target, check=True)


def tff_python() -> Path:
    return Path(os.environ.get("FEDRECON_TFF_PYTHON", REPO / ".venv-tff" / "bin" / "python"))


def _environment(logs: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["READMEWALK_LOGS"] = str(logs)
    env["READMEWALK_READY_S"] = str(SERVE_READY_S)
    env["FEDRECON_TFF_PYTHON"] = str(tff_python())
    env.pop("FEDRECON_TOKEN", None)
    env.pop("PYTHONPATH", None)
    return env


def runnable_now(block: Block) -> str | None:
    """Why ``block`` cannot run on this machine (missing data or TFF environment), or None."""
    if block.marker == "skip":
        return f"readme-test: skip ({block.reason})"
    if block.needs_data and not (ML_2998 / "ratings.dat.gz").is_file():
        return f"needs {ML_2998} (see ../shared/data/README.md)"
    if block.needs_tff and not tff_python().is_file():
        return f"needs the TFF environment at {tff_python()} (make tff-env)"
    return None


def _run_block(walk: Walk, block: Block, ports: dict[str, str], env: dict[str, str]) -> Outcome:
    var_lib = walk.root / "var-lib-fedrecon"
    var_lib.mkdir(exist_ok=True)
    stem = f"{block.document.replace('/', '_')}-{block.line}"
    if block.kind == "bash":
        script = walk.logs / f"{stem}.sh"
        script.write_text(bash_script(block, ports, var_lib))
        argv = ["bash", str(script)]
    else:
        script = walk.logs / f"{stem}.py"
        script.write_text(substitute(block.text, ports, var_lib))
        argv = [str(VENV / "bin" / "python"), str(script)]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=walk.copy, env=env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S)
        ok, output = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        ok, output = False, f"timed out after {BLOCK_TIMEOUT_S} s\n{err.stdout or ''}{err.stderr or ''}"
    (walk.logs / f"{stem}.out").write_text(output)
    return Outcome(ok, time.monotonic() - started, output)


def _stop_servers(walk: Walk, document: str) -> None:
    """SIGTERM every server the document's walk started; record how each exited."""
    listing = walk.logs / "servers"
    if not listing.exists():
        return
    for row in listing.read_text().split("\n"):
        if not row.strip():
            continue
        pid, port = row.split()
        key = f"{document}: serve on port {port} (pid {pid})"
        if pid in walk.stopped:
            continue  # stopped with an earlier document: never signal a pid twice (it may be reused)
        walk.stopped.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
        rc_file = walk.logs / f"serve-{pid}.rc"
        deadline = time.monotonic() + SERVE_STOP_S
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not rc_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        walk.server_exits[key] = int(rc_file.read_text()) if rc_file.exists() else None


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    root = tmp_path_factory.mktemp("readme-walk")
    copy = root / REPO.name
    copy.mkdir()
    logs = root / "logs"
    logs.mkdir()
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED, target_is_directory=True)
    _copy_repository(copy)
    walked = Walk(root, copy, logs)
    env = _environment(logs)
    try:
        for document in DOCUMENTS:
            blocks = [b for b in ALL_BLOCKS if b.document == document]
            text = (REPO / document).read_text(encoding="utf-8")
            ports = {number: _free_port() for number in sorted(set(re.findall(r"\b5005\d\b", text)))}
            try:
                for block in blocks:
                    if runnable_now(block) is None:
                        walked.outcomes[block.name] = _run_block(walked, block, ports, env)
            finally:
                _stop_servers(walked, document)
        yield walked
    finally:
        _stop_servers(walked, "left over")
        timing = ", ".join(f"{name} {o.seconds:.0f} s" for name, o in walked.outcomes.items())
        total = sum(o.seconds for o in walked.outcomes.values())
        print(f"\nreadme walk: {total:.0f} s in all ({timing})")


@pytest.mark.readme
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.name for b in ALL_BLOCKS])
def test_block_runs_as_written(block: Block, request: pytest.FixtureRequest,
                               require: Callable[[bool, str], None]) -> None:
    """Each block of the README, in order, exits 0 (the walk runs them all once, at the first test)."""
    why_not = runnable_now(block)
    if block.marker == "skip":
        pytest.skip(why_not)
    if why_not is not None:
        require(False, why_not)
    if block.marker is not None:
        request.applymarker(pytest.mark.xfail(strict=False, reason=f"readme-test: {block.marker} "
                                                                  f"({block.reason})"))
    outcome = request.getfixturevalue("walk").outcomes[block.name]
    assert outcome.ok, f"{block.name} failed ({outcome.seconds:.0f} s):\n{outcome.output[-6000:]}"


@pytest.mark.readme
def test_servers_stop_cleanly_on_sigterm(walk: Walk) -> None:
    """Every coordinator the README starts stops on SIGTERM with exit 0 (nothing accepted was lost)."""
    assert walk.server_exits, "the README starts no coordinator"
    assert all(code == 0 for code in walk.server_exits.values()), walk.server_exits


@pytest.mark.readme
def test_outputs_land_in_ignored_places(walk: Walk) -> None:
    """Run in a checkout, the README's commands leave ``git status`` clean: outputs are all git-ignored."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=walk.copy,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"outputs of the README's commands that git would see:\n{status}"


def test_skip_markers_are_few_and_explained() -> None:
    skipped = [b for b in ALL_BLOCKS if b.marker == "skip"]
    assert len(skipped) <= MAX_SKIPS, [b.name for b in skipped]
    assert all(b.reason.strip() for b in ALL_BLOCKS if b.marker), "every marker gives its reason"
    assert all(b.marker == "skip" or re.fullmatch(r"pending issue-\d+", b.marker)
               for b in ALL_BLOCKS if b.marker)


def test_every_documented_install_extra_exists() -> None:
    """The README's install lines name extras that pyproject.toml defines, and the Python it states."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    documented = set(re.findall(r"pip install [^`]*?\[(\w+)\]", readme))
    assert {"tf", "sim", "server"} <= documented, documented
    assert documented <= set(project["optional-dependencies"]), documented
    minimum = re.fullmatch(r">=(3\.\d+)", project["requires-python"])
    assert minimum and f"Python {minimum.group(1)} or newer" in readme


def test_every_marker_is_well_formed_and_stands_before_a_block() -> None:
    """A misspelt marker would silently run (or fail) a block meant to be skipped: each one must parse and
    sit on the line right before an opening fence."""
    for document in DOCUMENTS:
        lines = (REPO / document).read_text(encoding="utf-8").splitlines()
        for k, line in enumerate(lines):
            if "readme-test:" in line and not line.lstrip().startswith("``"):
                assert MARKER.match(line.strip()), f"{document}:{k + 1}: malformed marker {line!r}"
                assert k + 1 < len(lines) and FENCE.match(lines[k + 1]), \
                    f"{document}:{k + 1}: a marker must be on the line before a block's opening fence"


def test_the_quick_rules_rewrite_what_the_docstring_says() -> None:
    serve = rewrite_command("fedrecon serve --task t.toml --port 41000  ")
    assert serve.startswith("__readme_serve 41000 fedrecon serve")
    assert rewrite_command("make simulate").startswith(f"make -o setup VENV={VENV}")
    if not QUICK:
        return
    assert rewrite_command("fedrecon simulate --data x").endswith("--rounds 3")
    assert "--rounds 3" in rewrite_command("fedrecon simulate --rounds 500 --biases")
    assert "--rounds 2 " in rewrite_command("fedrecon simulate --rounds 2 --biases")
    assert rewrite_command("fedrecon simulate --algorithm centralized").endswith("--centralized-epochs 2")
    assert rewrite_command("fedrecon simulate --help") == "fedrecon simulate --help"
    assert "--rounds 1" in rewrite_command("fedrecon client --task t --rounds 5 --users 9")
    assert "ROUNDS=3" in rewrite_command("make simulate")
    assert _split_comment('fedrecon x --token "#1" # note') == ('fedrecon x --token "#1"', " # note")
