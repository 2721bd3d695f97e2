"""Every code snippet of the README and of ``docs/`` works, and the docs site builds.

- Python blocks (```` ```python ````) run, page by page, in one namespace per page (a later
  block may use what an earlier one defined), with ``rbp.ConvergenceWarning`` as an error: an
  example must not warn. A block that cannot run here (it needs a data set or a GPU) is marked
  by the line ``<!-- snippet: skip (the reason) -->`` just above it; keep that rare.
- Shell blocks (```` ```bash ````): each ``rbp COMMAND`` names a command of the CLI and only
  flags that command's ``--help`` lists; each ``python FILE`` names a file of the repository and
  only flags its ``--help`` lists; each repository path named (``configs/...``) exists.
- ``mkdocs build --strict`` succeeds (a broken link, anchor or API reference fails it).
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"<!--\s*snippet:\s*skip\b[^>]*-->\s*$")


def blocks(page: Path, lang: str) -> list[tuple[int, str, bool]]:
    """``(line, code, skipped)`` of the fenced blocks of ``lang`` in ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), bool(SKIP.search(before))))
    return out


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


PY_PAGES = [p for p in PAGES if blocks(p, "python")]
SH_PAGES = [p for p in PAGES if blocks(p, "bash")]


def test_the_pages_have_snippets() -> None:
    assert ROOT / "README.md" in PY_PAGES and len(PY_PAGES) >= 4
    skipped = [(_name(p), line) for p in PAGES for line, _, skip in blocks(p, "python") if skip]
    ran = sum(not skip for p in PAGES for _, _, skip in blocks(p, "python"))
    assert len(skipped) <= max(1, ran // 5), f"too many skipped snippets: {skipped}"


@pytest.mark.parametrize("page", PY_PAGES, ids=_name)
def test_python_snippets_run(page: Path) -> None:
    import torch

    import rbp

    # a real module, so that torch.compile can find the snippets' globals by module name
    module = types.ModuleType(f"snippets_{re.sub(r'[^A-Za-z0-9_]', '_', page.stem)}")
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    state = torch.random.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", rbp.ConvergenceWarning)
            for line, code, skipped in blocks(page, "python"):
                if skipped:
                    continue
                exec(compile(code, f"{_name(page)}:{line}", "exec"), namespace)  # noqa: S102
    finally:
        torch.random.set_rng_state(state)
        sys.modules.pop(module.__name__, None)


@functools.cache
def _help(argv: tuple[str, ...]) -> str:
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _commands() -> set[str]:
    text = _help((sys.executable, "-m", "rbp.runner"))
    return set(re.findall(r"^\s{2,6}([a-z][a-z0-9_-]*)\s", text.split("positional arguments:")[1]
                          .split("options:")[0], re.M))


def _lines(code: str) -> list[list[str]]:
    """The commands of a shell block: comments and ``ENV=value`` prefixes dropped, ``&&``
    split."""
    out = []
    for raw in code.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)
            if words:
                out.append(words)
    return out


@pytest.mark.parametrize("page", SH_PAGES, ids=_name)
def test_shell_snippets_name_real_commands_files_and_flags(page: Path) -> None:
    commands = _commands()
    problems = []
    for line, code, skipped in blocks(page, "bash"):
        if skipped:
            continue
        for words in _lines(code):
            where = f"{_name(page)}:{line}: {' '.join(words)}"
            flags = [w.split("=", 1)[0] for w in words if w.startswith("--")]
            for w in words:
                if re.match(r"^(configs|examples|benchmarks|tools|docs|src)/\S+\.\w+$", w) \
                        and not (ROOT / w).exists():
                    problems.append(f"{where}: no file {w}")
            if words[0] == "rbp":
                sub = words[1] if len(words) > 1 else ""
                if sub not in commands:
                    problems.append(f"{where}: no command 'rbp {sub}'")
                    continue
                text = _help((sys.executable, "-m", "rbp.runner", sub))
            elif words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
                if not (ROOT / words[1]).is_file():
                    problems.append(f"{where}: no file {words[1]}")
                    continue
                text = _help((sys.executable, words[1]))
            else:
                continue
            problems += [f"{where}: {f} is not an option" for f in flags
                         if f not in text and f != "--help"]
    assert not problems, "\n".join(problems)


def test_docs_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """``mkdocs build --strict`` (the command the README gives; CI runs it too)."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed")
    exe = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    proc = subprocess.run([exe, "build", "--strict", "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "fixed_point" / "index.html").is_file()
