"""Every command in README.md and docs/*.md is one that works: every `rangerdl` line parses and its
config resolves (the quick ones run), every benchmark script exists and takes the options shown, every
file named exists. A command of a kind this test does not know fails it, so new docs get checked.
Also: the docs speak of the product, not of how it was made."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIXES = ("rangerdl ", "python ", "torchrun ", "make ", "pip ", "source ", "tensorboard ")


def doc_commands(path: Path) -> list[str]:
    """Command lines of the fenced ``bash`` blocks and of the bare blocks that hold commands;
    trailing ``# comments`` and a trailing ``&`` dropped, ``a && b`` and ``a; b`` split."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.DOTALL):
        if lang not in ("bash", "", "sh"):
            continue
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip().removesuffix("&").strip()  # background
            if not line.startswith(PREFIXES):
                continue  # a bare block of program output, or a comment line
            commands += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return commands


ALL = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in doc_commands(path)]


def test_the_docs_have_commands() -> None:
    assert len(ALL) > 20
    assert {p for p, _ in ALL} >= {"README.md", "docs/trainer.md", "docs/benchmarks.md"}


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "rangerdl", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def check_rangerdl(argv: list[str], tmp_path: Path) -> None:
    from rangerdl.cli import build_parser
    from rangerdl.train.config import load_config

    parser = build_parser()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"does not parse: {err.getvalue()}")
    assert args.command is not None
    if extra:
        assert getattr(args, "accepts_extra", False), f"unrecognized arguments: {extra}"
    for name in ("config", "spec"):
        path = getattr(args, name, None)
        if path is not None:
            assert (ROOT / path).exists(), f"{path} does not exist"
    command = argv[0]
    if command == "train" and args.resume is None:
        load_config(ROOT / args.config if args.config else None, extra)
    elif command == "plan" and "--params" in argv:
        code, out = run_cli(argv, ROOT)
        assert code == 0, out
    elif command == "plan":
        load_config(ROOT / args.config if args.config else None, extra)
    elif command == "sweep":
        spec = tomllib.loads((ROOT / argv[1]).read_text())
        assert "sweep" in spec and "params" in spec["sweep"]
    elif command == "data" and argv[1] == "prepare" and argv[2] == "digits":
        code, out = run_cli(argv, tmp_path)
        assert code == 0, out
        code, out = run_cli(["data", "inspect", str(tmp_path / argv[-1] / "train")], tmp_path)
        assert code == 0, out
    # eval, plot, data inspect of a run or dataset the reader makes first: parsing is what we
    # can check without their inputs.


def check_script(argv: list[str]) -> None:
    """``python SCRIPT [SUBCOMMAND] --options``: the script exists and its --help (of the
    subcommand, if any) lists every option used."""
    script = ROOT / argv[0]
    assert script.is_file(), f"{argv[0]} does not exist"
    if script.suffix == ".py" and script.parent.name == "examples":
        return  # the examples run in their own tests
    sub = [argv[1]] if len(argv) > 1 and not argv[1].startswith("-") else []
    done = subprocess.run(
        [sys.executable, str(script), *sub, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for arg in argv[1:]:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            assert option in done.stdout, f"{argv[0]} {' '.join(sub)}: no option {option}"


@pytest.mark.slow
@pytest.mark.parametrize(("doc", "command"), ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_documented_command_works(doc: str, command: str, tmp_path: Path) -> None:
    words = shlex.split(command)
    head = words[0]
    if head == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert words[1] in targets, f"no make target {words[1]}"
    elif head == "pip":
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
        for word in words:
            for extra in re.findall(r"rangerdl\[([\w,]+)\]", word):
                assert set(extra.split(",")) <= set(extras), f"no extra {extra}"
    elif head in ("source", "tensorboard"):
        pass  # the shell's and TensorBoard's own
    elif head == "rangerdl":
        check_rangerdl(words[1:], tmp_path)
    elif head == "torchrun":
        rest = [w for w in words[1:] if not w.startswith("--")]
        if words[words.index(rest[0]) - 1] == "-m" or rest[0] == "-m":
            module_args = words[words.index("-m") + 2 :]
            check_rangerdl(module_args, tmp_path)
        else:
            check_script(rest)
    elif head == "python":
        if words[1] == "-m":
            assert words[2] == "rangerdl", command
            check_rangerdl(words[3:], tmp_path)
        else:
            check_script(words[1:])
    else:
        pytest.fail(f"{doc}: a command this test does not know how to check: {command}")


# How the project was made is not what a user reads: no work periods, issue numbers, or
# "earlier run" provenance in place of what was run.
HISTORY = re.compile(
    r"\b(work periods?|(previous|earlier|last|this|next|new) session|sessions? \d+|"
    r"issues? #?\d+|earlier (ablation|comparison|version|`?make bench)|round \d+ of work)\b"
    r"|(?<![\w/])#\d{1,3}\b",
    re.IGNORECASE,
)


def repo_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    keep = (".md", ".py", ".toml", ".json", ".sh", ".txt", ".cfg", ".ipynb")
    return [ROOT / f for f in out if f.endswith(keep) or f == "Makefile"]


def test_no_words_about_how_the_project_was_made() -> None:
    found = []
    for path in repo_text_files():
        if path == Path(__file__) or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            match = HISTORY.search(line)
            if match and "pytorch/pytorch#" not in line and "github.com" not in line:
                found.append(
                    f"{path.relative_to(ROOT)}:{n}: {match.group(0)!r}: {line.strip()[:90]}"
                )
    assert not found, "\n".join(found[:40])


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} does not exist")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", path.read_text(), re.MULTILINE)
                if anchor[1:] not in {github_anchor(h) for h in headings}:
                    broken.append(f"{doc.name}: no heading {anchor} in {target or doc.name}")
    assert not broken, "\n".join(broken)
