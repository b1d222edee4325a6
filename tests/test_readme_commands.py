"""Every `snakemake ...` command of README.md is dry-run and schedules the number of jobs the README states.

Convention (README.md): each snakemake command, in a fenced bash block or in inline code, ends with a shell
comment that states what its dry run schedules:

    snakemake --cores 2 results/figures/froc.pdf                      # one figure; dry run: 30 jobs
    snakemake --cores 2 TARGET --forcerun finetune                    # dry run after the demo: 3 jobs

``dry run: N jobs`` counts in a fresh clone (nothing built yet); ``dry run after the demo: N jobs`` counts in a
checkout where the demo (`make demo`, the default target of config/config.yaml) has finished. A command may state
both. The after-the-demo state is made without running anything: every output file of the demo's dry run is
created empty (directories as folders) with one common timestamp, so Snakemake sees them all present and up to
date. Each command runs exactly as written, plus ``-n`` right after ``snakemake``, in a scratch copy of the
workflow (Snakefile, workflow/, config/, profiles/, envs/, and src/ linked), from that copy as working directory.

SLURM: commands with ``--profile profiles/slurm`` are dry-run with that profile as written; a dry run submits
nothing and needs no ``sbatch`` (the SLURM executor is not started in dry-run mode), so no cluster is needed here.

A snakemake command without a count fails the test, unless it is listed in NOT_DRY_RUN with the reason.
This guards, among others, the trap of multi-value options: ``--forcerun finetune TARGET`` swallows TARGET into
``--forcerun`` and reruns every fine-tuning job (46 jobs after the demo instead of 3).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
WORKFLOW_FILES = ["Snakefile", "workflow", "config", "profiles", "envs"]

# Commands the README shows that a dry run cannot check, with the reason.
NOT_DRY_RUN = {
    "snakemake --configfile config/paper.yaml config/paper_pretrain.yaml --rulegraph": "prints the rule graph (`make dag` draws it); it "
    "schedules no job, so there is no count to compare",
    "snakemake --report results/report.html": "builds the HTML report from finished results; a dry run schedules "
    "no job and the report of an empty or faked results/ folder checks nothing",
}

COUNT = re.compile(r"dry run(?P<after> after the demo)?: (?P<n>\d+) jobs?\b")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)$")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}


@dataclass(frozen=True)
class Command:
    line: int  # 1-based line of README.md where the command starts
    text: str  # the command without its comment, continuation lines joined
    comment: str  # the trailing shell comment ('' if none)

    def expected(self) -> dict[str, int]:
        """State ('fresh' or 'after_demo') -> job count stated in the comment."""
        counts = {}
        for match in COUNT.finditer(self.comment):
            counts["after_demo" if match.group("after") else "fresh"] = int(match.group("n"))
        return counts


def split_comment(line: str) -> tuple[str, str]:
    """Split a shell line at its first unquoted ``#`` that starts a word."""
    quote = None
    escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join lines ending in a backslash with the next one; keep the first line's number."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.lstrip()
            pending = None
        code, _comment = split_comment(line)
        if code.endswith("\\") and not code.endswith("\\\\"):
            pending = (number, code[:-1].rstrip())
        else:
            joined.append((number, line))
    if pending is not None:
        joined.append(pending)
    return joined


def as_command(number: int, line: str) -> Command | None:
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:].lstrip()
    code, comment = split_comment(line)
    if code.split(maxsplit=1)[:1] != ["snakemake"]:
        return None
    return Command(number, " ".join(code.split()), comment)


def readme_commands(text: str) -> list[Command]:
    """Every snakemake command in fenced shell blocks and in inline code spans of a Markdown text."""
    commands: list[Command] = []
    prose: list[tuple[int, str]] = []
    block: list[tuple[int, str]] | None = None
    fence = language = ""
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if block is None and match:
            fence, language, block = match.group("fence"), match.group("info").strip().split(" ")[0].lower(), []
        elif block is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            if language in SHELL_LANGUAGES or not language:
                for start, joined in logical_lines(block):
                    command = as_command(start, joined)
                    if command:
                        commands.append(command)
            block = None
        elif block is not None:
            block.append((number, line))
        else:
            prose.append((number, line))
    # Inline code: a span may wrap over lines (Markdown renders the line break as a space).
    offsets, flat = [], []
    for number, line in prose:
        offsets.append((sum(len(part) + 1 for part in flat), number))
        flat.append(line)
    joined_prose = "\n".join(flat)
    for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", joined_prose, flags=re.S):
        span = " ".join(match.group(2).split())
        line_number = max(n for offset, n in offsets if offset <= match.start())
        command = as_command(line_number, span)
        if command:
            commands.append(command)
    return sorted(commands, key=lambda c: c.line)


def job_total(output: str) -> int:
    """Total jobs of a dry run's 'Job stats' table; 0 when there is nothing to do."""
    if "Nothing to be done" in output:
        return 0
    match = re.search(r"^Job stats:\n.*?^total\s+(\d+)\s*$", output, flags=re.M | re.S)
    if not match:
        raise AssertionError(f"no job total in the dry run's output:\n{output[-3000:]}")
    return int(match.group(1))


def scratch_workflow(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / name)
    (root / "src").symlink_to(REPO / "src")
    return root


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def dry_run(workdir: Path, command: str) -> tuple[int, str]:
    argv = shlex.split(command)
    assert argv[0] == "snakemake"
    args = argv[1:]
    if not {"-n", "--dry-run", "--dryrun"} & set(args):
        args = ["-n", *args]  # first, so that no multi-value option swallows it and no `--` makes it a target
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True,
                            text=True, env=environment(), timeout=300)
    return result.returncode, result.stdout + result.stderr


def fake_finished_demo(workdir: Path) -> None:
    """Create every output of the demo's default target, all with one timestamp (see the module docstring)."""
    code, output = dry_run(workdir, "snakemake --cores 2")
    assert code == 0, output[-4000:]
    outputs = set()
    for match in re.finditer(r"^\s+output: (.+)$", output, flags=re.M):
        outputs.update(path.strip() for path in match.group(1).split(","))
    assert len(outputs) > 20, f"too few outputs parsed from the demo's dry run: {sorted(outputs)}"
    for relative in sorted(outputs):
        path = workdir / relative
        if Path(relative).suffix:  # files have an extension; the workflow's directory() outputs do not
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    stamp = 1_767_225_600  # 2026-01-01, any fixed time
    for path in (workdir / "results").rglob("*"):
        os.utime(path, (stamp, stamp))
    code, output = dry_run(workdir, "snakemake --cores 2")
    assert code == 0 and job_total(output) == 0, f"the faked demo is not up to date:\n{output[-4000:]}"


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(state: str) -> Path:
        if state not in made:
            made[state] = scratch_workflow(tmp_path_factory.mktemp("readme") / state)
            if state == "after_demo":
                fake_finished_demo(made[state])
        return made[state]

    return get


def test_the_readme_has_snakemake_commands():
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) >= 8, texts
    assert any("--profile profiles/slurm" in t for t in texts)
    assert any("--forcerun" in t for t in texts)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"line{c.line}")
def test_every_command_states_its_job_count(command):
    if command.text in NOT_DRY_RUN:
        assert not command.expected(), f"README.md:{command.line} states a count for a command listed in NOT_DRY_RUN"
        return
    assert command.expected(), (
        f"README.md:{command.line}: `{command.text}` needs a trailing comment `# dry run: N jobs` "
        "(or `# dry run after the demo: N jobs`), or an entry in NOT_DRY_RUN with the reason"
    )


DRY_RUNS = [(c, state) for c in COMMANDS for state in sorted(c.expected())]


@pytest.mark.parametrize("command, state", DRY_RUNS, ids=lambda x: x if isinstance(x, str) else f"line{x.line}")
def test_dry_run_schedules_the_stated_number_of_jobs(workdirs, command, state):
    code, output = dry_run(workdirs(state), command.text)
    assert code == 0, f"README.md:{command.line}: `{command.text}` failed ({code}):\n{output[-4000:]}"
    total = job_total(output)
    assert total == command.expected()[state], (
        f"README.md:{command.line}: `{command.text}` schedules {total} jobs ({state.replace('_', ' ')}), "
        f"the README says {command.expected()[state]}"
    )


def test_forcerun_of_one_target_stays_small(workdirs):
    """The regression this file guards: the target written after --forcerun's list must not be swallowed."""
    forced = [c for c in COMMANDS if "--forcerun" in c.text and "after_demo" in c.expected()]
    assert forced, "the README should show a --forcerun rerun of one target, counted after the demo"
    for command in forced:
        assert command.expected()["after_demo"] <= 4, command  # finetune, predict, consolidate, evaluate
    # and the swallowed form really is the trap: the whole fine-tuning grid, as many jobs as the README warns
    stated = re.search(r"\((\d+) jobs after the demo instead of 4\)", README.read_text(encoding="utf-8"))
    assert stated, "the README should warn how many jobs the swallowed form schedules"
    code, output = dry_run(workdirs("after_demo"), "snakemake --cores 2 --forcerun finetune "
                           "results/metrics/retina_unet/mae/synth_lesions/fold0.json")
    assert code == 0, output[-4000:]
    assert job_total(output) == int(stated.group(1)) > 3 * 2 * 6


README_SAMPLE = """\
Text with `snakemake --cores 2 results/a.json  # dry run: 4 jobs` inline, and one that wraps:
`snakemake --cores 2
--config x=1  # dry run: 2 jobs`; not a command: `--profile profiles/slurm`, `python -m x`.

```bash
make install   # not snakemake
snakemake --configfile config/paper.yaml \\
    --profile profiles/slurm       # submit; dry run: 7 jobs
$ snakemake --cores 2 --config study='{a: "#x"}' -- target   # dry run after the demo: 3 jobs
snakemake --cores 2 results/b.json
```

```python
snakemake = "not a shell command"
```
"""


def test_the_parser_reads_fenced_inline_and_wrapped_commands():
    commands = readme_commands(README_SAMPLE)
    assert [(c.line, c.text, c.expected()) for c in commands] == [
        (1, "snakemake --cores 2 results/a.json", {"fresh": 4}),
        (2, "snakemake --cores 2 --config x=1", {"fresh": 2}),
        (7, "snakemake --configfile config/paper.yaml --profile profiles/slurm", {"fresh": 7}),
        (9, "snakemake --cores 2 --config study='{a: \"#x\"}' -- target", {"after_demo": 3}),
        (10, "snakemake --cores 2 results/b.json", {}),
    ]


def test_a_command_without_a_count_is_reported():
    (command,) = [c for c in readme_commands(README_SAMPLE) if c.text.endswith("results/b.json")]
    with pytest.raises(AssertionError, match="needs a trailing comment"):
        test_every_command_states_its_job_count(command)
