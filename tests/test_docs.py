"""
The documentation (README.md and docs/*.md) against the repository, without a process group:

- every relative link reaches a file, and a `#anchor` a heading of it (GitHub's rule: lowercase, punctuation dropped,
  spaces to hyphens, a repeated heading numbered -1, -2, ...);
- every repository path named in backticks, in text or in a code block (`parallel/ddp.py`, `config/x.py`,
  `docs/pp_unit_*_p4_m8.png`, `{a,b}` alternatives) exists, except the files a run writes (data/*/train.bin ...);
- every command of a code block, or of a code span that is a whole command, parses: `python train.py ...` and
  `torchrun ... train.py ...` through config/__init__.py's loader and range checks, with a registered (parallel,
  variant); `sample.py`'s and `python -m sim`'s arguments through their loaders; an argparse script or module
  (`python -m bench.comm ...`, `python data/x/prepare.py ...`) run up to its `parse_args`, which must accept the
  arguments, and no further; `python -m unittest FILE` names a file; `python -c CODE` compiles; `make TARGET` passes
  `make -n TARGET`.

The parsing runs in one subprocess (`python -m tests.test_docs --driver`: torch is imported once, and the modules run
as __main__ leave nothing behind in the test process), which also parses three deliberately wrong commands that must
fail, so the checker can fail. About 5 s at load average 7-9.

    .venv/bin/python -m pytest -q tests/test_docs.py
"""

import argparse
import glob
import importlib.util
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# the repository's top level: a path in backticks is checked when it starts with one of these
TOP_DIRS = (".ci", "bench", "config", "data", "docs", "kernels", "parallel", "sim", "tests", "tools")
TOP_FILES = ("train.py", "model.py", "sample.py", "Makefile", "Dockerfile", "requirements.txt", "README.md")
GENERATED = re.compile(r"(^|/)(train\.bin|val\.bin|meta\.pkl)$")  # written by data/<name>/prepare.py
COMMANDS = ("python", "python3", "torchrun", "make")
# commands that must fail, to show that the driver can (checked by test_every_command_parses)
BROKEN = ["python train.py config/train_shakespeare_char_cpu.py --batch_sise=8",
          "torchrun --standalone --nproc_per_node=2 -m bench.comm --no-such-option=1",
          "python train.py config/train_shakespeare_char_cpu.py --parallel=ddp --variant=tritn"]


# -----------------------------------------------------------------------------
# reading Markdown

def read(doc):
    """(headings, prose paragraphs, fenced blocks) of the Markdown file `doc` (relative to REPO); a paragraph or a
    block is (first line number, text)."""
    headings, paragraphs, blocks = [], [], []
    fence, lines, start = None, [], 0
    for number, line in enumerate(open(os.path.join(REPO, doc), encoding="utf-8").read().split("\n"), 1):
        marker = re.match(r"\s{0,3}(```+|~~~+)", line)
        if fence is not None:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                blocks.append((start, "\n".join(lines)))
                fence, lines = None, []
            else:
                lines.append(line)
            continue
        if marker:
            if lines:
                paragraphs.append((start, "\n".join(lines)))
            fence, lines, start = marker.group(1), [], number + 1
            continue
        heading = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if heading:
            headings.append(heading.group(2))
        if not line.strip() or heading:
            if lines:
                paragraphs.append((start, "\n".join(lines)))
            lines = []
            continue
        if not lines:
            start = number
        lines.append(line)
    if lines and fence is None:
        paragraphs.append((start, "\n".join(lines)))
    assert fence is None, f"{doc}: a code block opened at line {start} is never closed"
    return headings, paragraphs, blocks


def slug(heading):
    """GitHub's anchor of a heading: the text without Markdown's formatting, lowercased, every character but letters,
    digits, '_', '-' and spaces dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(headings):
    """Every anchor of a page: a repeated slug gets -1, -2, ... as GitHub numbers them."""
    seen, out = {}, set()
    for heading in headings:
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(paragraph):
    """The link targets of a paragraph, outside its code spans."""
    return LINK.findall(CODE_SPAN.sub("", paragraph))


def expand(path):
    """A path with {a,b} alternatives as the list of its spellings."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def repo_paths(text):
    """The repository paths a piece of text names: tokens that start with a top-level directory and a slash, or are
    a top-level file. Placeholders (<name>) and the files a run writes are left out."""
    found = []
    for token in re.split(r"[\s=\"'`();:\[\]]+", text):
        token = token.rstrip(".,")
        if not token or "<" in token or ">" in token or token.startswith("..."):
            continue
        if token in TOP_FILES or (token.split("/")[0] in TOP_DIRS and "/" in token):
            found.extend(p for p in expand(token) if not GENERATED.search(p))
    return found


def exists(path):
    if any(c in path for c in "*?"):
        return bool(glob.glob(os.path.join(REPO, path)))
    return os.path.exists(os.path.join(REPO, path))


def check_links_and_paths(docs):
    """Every problem of `docs`' links, anchors and named paths, as 'file:line: message' strings."""
    pages = {doc: read(doc) for doc in docs}
    problems = []
    for doc, (headings, paragraphs, blocks) in pages.items():
        for line, text in paragraphs:
            for target in links(text):
                if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
                if not os.path.exists(os.path.join(REPO, file)):
                    problems.append(f"{doc}:{line}: link to {target}: {file} does not exist")
                elif anchor and file.endswith(".md"):
                    headings_there = pages[file][0] if file in pages else read(file)[0]
                    if anchor not in anchors(headings_there):
                        problems.append(f"{doc}:{line}: link to {target}: {file} has no heading #{anchor}")
            for span in CODE_SPAN.findall(text):
                for path in repo_paths(span[1]):
                    if not exists(path):
                        problems.append(f"{doc}:{line}: `{path}` does not exist")
        for line, text in blocks:
            for path in repo_paths(text):
                if not exists(path):
                    problems.append(f"{doc}:{line}: {path} (in a code block) does not exist")
    return problems


def shell_lines(docs):
    """[(file:line, shell line, inline)] of `docs`: each line of a code block (continuation lines joined) and each
    code span of the text."""
    lines = []
    for doc in docs:
        _, paragraphs, blocks = read(doc)
        for start, text in blocks:
            rows, i = text.split("\n"), 0
            while i < len(rows):
                line, first = rows[i], i
                while line.endswith("\\") and i + 1 < len(rows):
                    i += 1
                    line = line[:-1] + " " + rows[i]
                i += 1
                lines.append((f"{doc}:{start + first}", line, False))
        for start, text in paragraphs:
            lines += [(f"{doc}:{start}", " ".join(span.split()), True) for _, span in CODE_SPAN.findall(text)]
    return lines


def commands(docs):
    """[(file:line, command as a list of words)] of every python/torchrun/make command in `docs`: in code blocks
    (comments dropped, split at &&, ; and |; leading VAR=value words, a shell prompt ($) and srun with its options
    dropped) and in code spans that are a whole command (a script or module named, no <placeholder> or [option])."""
    found = []
    for place, line, inline in shell_lines(docs):
        if inline and (not re.match(r"(python3?|torchrun|make) ", line) or re.search(r"[<\[]", line)):
            continue
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
        except ValueError:  # not shell (an output block)
            continue
        for is_sep, group in itertools.groupby(words, lambda w: w in (";", "&&", "||", "|", "&")):
            group = list(group)
            while group and (re.match(r"^\w+=", group[0]) or group[0] == "$"):
                group = group[1:]
            if group and group[0] == "srun":
                group = group[1:]
                while group and group[0].startswith("-"):
                    group = group[1:]
            if is_sep or not group or group[0] not in COMMANDS:
                continue
            if inline and group[0] != "make":
                try:
                    entry_point(group)
                except (ValueError, IndexError):  # `torchrun --max-restarts=N`: an option, not a command
                    continue
            if not (inline and group[0] == "make" and len(group) < 2):
                found.append((place, group))
    return found


# -----------------------------------------------------------------------------
# parsing a command without running it (in the driver process)

class Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args once the arguments parsed: the script stops there."""


PARSED = []  # not empty once the patched parse_args accepted the arguments of the program being checked


def entry_point(words):
    """(kind, target, args) of a python or torchrun command: kind "script" (target a path), "module" (a module
    name) or "code" (python -c); raises ValueError for what is neither."""
    words = list(words)
    launcher, words = words[0], words[1:]
    while words and words[0].startswith("-"):
        option = words.pop(0)
        if option == "-m":
            return "module", words[0], words[1:]
        if option == "-c" and launcher != "torchrun":
            return "code", words[0], words[1:]
    if not words:
        raise ValueError("no script or module")
    return "script", words[0], words[1:]


def check_command(words):
    """Parse one python/torchrun command's arguments the way its program does, without running it; return None,
    or a one-line error."""
    import config
    kind, target, args = entry_point(words)
    if kind == "code":
        compile(target, "<python -c>", "exec")
        return None
    if kind == "module" and target == "unittest":
        missing = [a for a in args if not a.startswith("-") and not os.path.exists(os.path.join(REPO, a))]
        return f"unittest: {missing} not found" if missing else None
    if kind == "script" and target == "train.py":
        import parallel
        import train
        cfg = config.check_train_config(config.load_config(train.DEFAULTS, args))
        if (cfg["parallel"], cfg["variant"]) not in parallel.available():
            return f"parallel={cfg['parallel']!r} has no variant {cfg['variant']!r}"
        return None
    if kind == "script" and target == "sample.py":
        import sample
        config.load_config(sample.DEFAULTS, args)
        return None
    if kind == "module" and target == "sim":
        import sim.config
        sim.config.load(args)
        return None
    if kind == "script":
        path = os.path.join(REPO, target)
        if not os.path.isfile(path):
            return f"{target} not found"
    else:
        spec = importlib.util.find_spec(target)
        if spec is None:
            return f"no module {target}"
        path = spec.origin if not spec.submodule_search_locations else \
            os.path.join(spec.submodule_search_locations[0], "__main__.py")
    if "argparse" not in open(path, encoding="utf-8").read():
        return None  # no parser to ask (e.g. parallel/checkpoint.py's two positional arguments): it exists
    argv, stdout, exit_now = sys.argv, sys.stdout, os._exit
    sys.argv, sys.stdout = [path, *args], sys.stderr
    os._exit = sys.exit  # an entry point's teardown (parallel.teardown) ends with os._exit: let it unwind instead
    PARSED.clear()
    try:
        if kind == "script":
            runpy.run_path(path, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except BaseException as e:  # Parsed, or what a `finally: teardown()` raised after it
        if PARSED:
            return None
        if isinstance(e, SystemExit):
            return f"argparse refused the arguments (exit {e.code})"
        raise
    finally:
        sys.argv, sys.stdout, os._exit = argv, stdout, exit_now
    return "ran to the end without calling parse_args"


def driver(entries):
    """{label: error or None} for [(label, words)]; the arguments of argparse programs are parsed by the real
    parser, patched to stop the program right after a successful parse."""
    sys.path.insert(0, REPO)
    os.chdir(REPO)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        PARSED.append(True)
        raise Parsed()

    argparse.ArgumentParser.parse_args = parse_and_stop
    results = {}
    for label, words in entries:
        try:
            results[label] = check_command(words)
        except Parsed:
            results[label] = None
        except (Exception, SystemExit) as e:  # ConfigError, ValueError, SyntaxError, an import error...
            results[label] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return results


# -----------------------------------------------------------------------------
# the tests

def test_links_anchors_and_paths():
    problems = check_links_and_paths(DOCS)
    assert not problems, "\n".join(problems)


def test_code_points_at_existing_pages():
    """A docstring or comment that sends the reader to docs/<page>.md names a page that exists."""
    missing = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith((".", "out-", "__pycache__"))]
        for name in files:
            if name.endswith(".py") and name != "test_docs.py":  # this file names pages that are missing on purpose
                path = os.path.join(root, name)
                for page in set(re.findall(r"docs/[\w-]+\.md", open(path, encoding="utf-8").read())):
                    if not os.path.exists(os.path.join(REPO, page)):
                        missing.append(f"{os.path.relpath(path, REPO)}: {page}")
    assert not missing, "\n".join(missing)


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A broken link, a missing heading, a missing path and a bad command line are each reported."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    (tmp_path / "docs").mkdir()
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "ddp.py").write_text("")
    (tmp_path / "train.py").write_text("")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## A section: with punctuation, `code`\n\n"
        "[ok](docs/a.md#second-one) [ok](#a-section-with-punctuation-code)\n"
        "[bad](docs/missing.md) [bad](docs/a.md#nope)\n"
        "`parallel/ddp.py` and `parallel/fsdp.py` and `parallel/{ddp,tp}.py` and `data/x/train.bin`\n\n"
        "```bash\nFOO=1 python train.py config/x.py \\\n    --a=1  # comment\n"
        "make test && torchrun -m sim --x=1\n```\n")
    (tmp_path / "docs" / "a.md").write_text("# Second one\n\n## Second one\n")
    problems = check_links_and_paths(["README.md", "docs/a.md"])
    assert any("docs/missing.md does not exist" in p for p in problems)
    assert any("has no heading #nope" in p for p in problems)
    assert any("`parallel/fsdp.py` does not exist" in p for p in problems)
    assert any("`parallel/tp.py` does not exist" in p for p in problems)
    assert any("config/x.py (in a code block) does not exist" in p for p in problems)
    assert len(problems) == 5, problems
    assert anchors(["Second one", "Second one"]) == {"second-one", "second-one-1"}
    assert [words for _, words in commands(["README.md"])] == [
        ["python", "train.py", "config/x.py", "--a=1"], ["make", "test"], ["torchrun", "-m", "sim", "--x=1"]]


@pytest.fixture(scope="module")
def parsed():
    """{command: error or None} for every python/torchrun command of the docs and BROKEN, from one driver process."""
    entries = [(" ".join(words), words) for _, words in commands(DOCS) if words[0] != "make"]
    entries += [(line, shlex.split(line)) for line in BROKEN]
    result = subprocess.run([sys.executable, "-m", "tests.test_docs", "--driver"], cwd=REPO, input=json.dumps(entries),
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_command_parses(parsed):
    where = {" ".join(words): place for place, words in commands(DOCS)}
    bad = [f"{where[c]}: {c}\n    {error}" for c, error in parsed.items() if error and c not in BROKEN]
    assert not bad, "\n".join(bad)
    assert len(parsed) > 40  # not vacuous: the docs' commands were found
    for line in BROKEN:
        assert parsed[line], f"the driver accepted a wrong command: {line}"


def test_every_make_target_exists():
    targets = sorted({w for _, words in commands(DOCS) if words[0] == "make" for w in words[1:]
                      if not w.startswith("-") and "=" not in w})
    assert {"train", "test", "gpu-check"} <= set(targets)
    for target in targets + ["no-such-target"]:
        result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert (result.returncode == 0) == (target != "no-such-target"), f"make -n {target}: {result.stderr}"


if __name__ == "__main__" and sys.argv[1:] == ["--driver"]:
    results = driver(json.load(sys.stdin))
    print(json.dumps(results), flush=True)
    os._exit(0)  # whatever the modules run as __main__ left behind (threads, process groups), leave now
