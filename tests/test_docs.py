"""The documentation runs: its runnable snippets succeed and its relative links resolve.

A fenced block in README.md or docs/*.md whose info string is ``python runnable`` or
``bash runnable`` is one test case, named by the file and the line of its opening fence
(``docs/losses.md:42``). Each block runs on its own, in a fresh subprocess
(``sys.executable`` for python, ``bash -euo pipefail`` for bash) with
``JAX_PLATFORMS=cpu``, in a directory of its own laid out like a checkout: symlinks to the
repository's configs/, benchmarks/, launch/ and notebooks/, and tiny datasets under data/
(written by tests/data_fixtures.py) at the paths the docs use. No block sees another's
files, so blocks need no order and spread over pytest-xdist workers. gcloud, ssh, scp and
git are stand-ins that fail and are reported: a runnable block never reaches a cloud or
another machine (launcher commands are runnable only with --dry-run).

Plain ``python`` and ``bash`` blocks are illustrative and never run. docs/testing.md
describes the convention.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import pytest

import data_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNNABLE_LANGUAGES = ("python", "bash")
TIMEOUT_S = 300           # one block; the slowest (a training run and its resume) takes ~1 min
OUTPUT_TAIL_CHARS = 4000  # of a failing block's output, in the assertion message
CHECKOUT_DIRS = ("configs", "benchmarks", "launch", "notebooks")
STAND_IN_TOOLS = ("gcloud", "ssh", "scp", "git")

# The fewest runnable blocks each page must keep: removing the markers fails
# test_every_page_keeps_its_runnable_blocks. A new page needs an entry here.
MIN_RUNNABLE = {
    "README.md": 1,
    "docs/README.md": 0,
    "docs/data.md": 2,
    "docs/embed.md": 1,
    "docs/evaluation.md": 1,
    "docs/export.md": 1,
    "docs/gpw_analysis.md": 2,
    "docs/launching.md": 3,
    "docs/losses.md": 3,
    "docs/memory.md": 2,
    "docs/models.md": 3,
    "docs/performance.md": 1,
    "docs/proxies.md": 2,
    "docs/search.md": 2,
    "docs/testing.md": 0,
    "docs/training.md": 1,
}


def _datasets(data: pathlib.Path) -> None:
  """The datasets the docs' commands read, at the paths they name (big enough for the
  configs' P×K batches: CUB 16 classes × 5, In-Shop 60 items × 4)."""
  fx.make_cub(str(data), num_classes=34, sizes=5)             # data/CUB_200_2011
  fx.make_inshop(str(data / "inshop"), num_items=124, sizes=4)  # data/inshop


# ------------------------------------------------------------------------- collecting


@dataclasses.dataclass(frozen=True)
class Block:
  """A runnable fenced block: where it is, its language and its code."""

  path: str   # as shown in test ids and failures, e.g. "docs/losses.md"
  line: int   # 1-based line of the opening fence
  language: str
  code: str

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def fenced_blocks(text: str, name: str = "<text>"):
  """Yields ``(line of the opening fence, info string, code)`` of every fenced block
  (CommonMark: a fence closes on the same character, at least as long, with no info)."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m or (m["fence"][0] == "`" and "`" in m["info"]):
      i += 1
      continue
    start, fence, indent = i, m["fence"], len(m["indent"])
    body = []
    i += 1
    while i < len(lines):
      close = _FENCE.match(lines[i])
      if (close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence)
          and not close["info"].strip()):
        break
      line = lines[i]
      body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
      i += 1
    else:
      raise ValueError(f"{name}:{start + 1}: the fenced block opened here is never closed.")
    yield start + 1, m["info"].strip(), "\n".join(body) + "\n"
    i += 1


def runnable_blocks(path: pathlib.Path, root: pathlib.Path = REPO) -> list[Block]:
  """The runnable blocks of the Markdown file ``path``, named relative to ``root``."""
  name = path.relative_to(root).as_posix()
  blocks = []
  for line, info, code in fenced_blocks(path.read_text(encoding="utf-8"), name):
    words = info.split()
    if "runnable" not in words[1:]:
      continue
    if words[0] not in RUNNABLE_LANGUAGES:
      raise ValueError(f"{name}:{line}: only {' and '.join(RUNNABLE_LANGUAGES)} blocks can "
                       f"be runnable; this one is {words[0]!r}.")
    blocks.append(Block(name, line, words[0], code))
  return blocks


def doc_files(root: pathlib.Path = REPO) -> list[pathlib.Path]:
  return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def all_runnable_blocks() -> list[Block]:
  return [b for path in doc_files() for b in runnable_blocks(path)]


# ---------------------------------------------------------------------------- running


def make_checkout(directory: pathlib.Path, data: pathlib.Path) -> pathlib.Path:
  """``directory`` laid out like a checkout for the docs' commands: the repository's
  folders as symlinks, ``data`` as data/, and the failing stand-ins under .bin/."""
  directory.mkdir(parents=True, exist_ok=True)
  for name in CHECKOUT_DIRS:
    (directory / name).symlink_to(REPO / name, target_is_directory=True)
  (directory / "data").symlink_to(data, target_is_directory=True)
  bin_dir = directory / ".bin"
  bin_dir.mkdir()
  for tool in STAND_IN_TOOLS:
    (bin_dir / tool).write_text(
        f"#!/bin/sh\necho \"{tool} $*\" >> '{directory / '.called'}'\n"
        f"echo '{tool} is not available to runnable doc blocks' >&2\nexit 1\n")
    (bin_dir / tool).chmod(0o755)
  return directory


def block_env(checkout: pathlib.Path, cache_dir: pathlib.Path | None = None) -> dict:
  """The environment a block runs in: this Python first on PATH after the stand-ins, JAX
  on the CPU, and no inherited JAX, XLA or msjax settings."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_", "MSJAX_", "PYTEST_"))}
  env["PATH"] = os.pathsep.join([str(checkout / ".bin"), os.path.dirname(sys.executable),
                                 env.get("PATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  if cache_dir is not None:
    # The test's own speed-up, invisible to the commands: the blocks of one session share
    # compiled programs (most of a short training run's time).
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def run_block(block: Block, checkout: pathlib.Path, *, env: dict | None = None,
              timeout: float = TIMEOUT_S) -> str:
  """Runs ``block`` in ``checkout``; returns its output, or raises ``AssertionError``
  naming ``file:line``, the block's code and the end of its output.

  The script is written with the block's code at the same line numbers as in its file,
  so a traceback's or bash's line number is the Markdown file's line.
  """
  script = checkout / ".snippets" / block.path
  script.parent.mkdir(parents=True, exist_ok=True)
  script.write_text("\n" * block.line + block.code, encoding="utf-8")
  if block.language == "python":
    argv = [sys.executable, str(script)]
  else:
    argv = ["bash", "-euo", "pipefail", str(script)]
  env = block_env(checkout) if env is None else env
  proc = subprocess.Popen(argv, cwd=checkout, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True)
  try:
    output, _ = proc.communicate(timeout=timeout)
    failure = None if proc.returncode == 0 else f"exited with status {proc.returncode}"
  except subprocess.TimeoutExpired:
    failure = f"timed out after {timeout:g} s"
    os.killpg(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate()
  finally:
    # Whatever the block started in the background (input workers, nohup) ends with it.
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
  called = checkout / ".called"
  if called.exists():
    failure = (f"called {called.read_text().strip()!r}; runnable blocks must not reach "
               "outside this machine (use --dry-run)")
  if failure:
    tail = output[-OUTPUT_TAIL_CHARS:]
    raise AssertionError(
        f"{block.where}: the {block.language} block {failure}.\n\n"
        f"{textwrap.indent(block.code.rstrip(), '    ')}\n\n"
        f"last output ({block.where} is line {block.line} of the script):\n"
        f"{textwrap.indent(tail.rstrip(), '    ')}")
  return output


# ------------------------------------------------------------------------------ tests


@pytest.fixture(scope="session")
def docs_data(tmp_path_factory):
  data = tmp_path_factory.mktemp("docs-data")
  _datasets(data)
  return data


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("docs-jax-cache")


_BLOCKS = all_runnable_blocks()


@pytest.mark.parametrize("block", _BLOCKS, ids=[b.where for b in _BLOCKS])
def test_runnable_block(block, tmp_path, docs_data, compilation_cache):
  checkout = make_checkout(tmp_path / "checkout", docs_data)
  run_block(block, checkout, env=block_env(checkout, compilation_cache))


def test_every_page_keeps_its_runnable_blocks():
  counts = {p.relative_to(REPO).as_posix(): len(runnable_blocks(p)) for p in doc_files()}
  assert set(counts) == set(MIN_RUNNABLE), (
      "every page needs an entry in MIN_RUNNABLE (and every entry a page): "
      f"{sorted(set(counts) ^ set(MIN_RUNNABLE))}")
  fewer = {p: f"{counts[p]} < {n}" for p, n in MIN_RUNNABLE.items() if counts[p] < n}
  assert not fewer, f"pages lost runnable blocks: {fewer}"


BROKEN_PAGE = """\
# A page with broken snippets

```bash runnable
python -m msjax.data chek --config configs/synthetic.py
```

Prose, then a broken Python snippet:

```python runnable
import msjax.losses as L
L.ms_los
```

```python
illustrative only: never run
```
"""


def test_the_checker_fails_a_broken_block_naming_file_and_line(tmp_path):
  page = tmp_path / "docs" / "broken.md"
  page.parent.mkdir()
  page.write_text(BROKEN_PAGE)
  bash, python = runnable_blocks(page, tmp_path)
  assert (bash.where, bash.language) == ("docs/broken.md:3", "bash")
  assert (python.where, python.language) == ("docs/broken.md:9", "python")
  checkout = make_checkout(tmp_path / "checkout", tmp_path)

  with pytest.raises(AssertionError) as failed:
    run_block(bash, checkout)
  message = str(failed.value)
  assert message.startswith("docs/broken.md:3: the bash block exited with status 1")
  assert "python -m msjax.data chek --config configs/synthetic.py" in message
  assert "usage: python -m msjax.data {check|prepare_tfds}" in message  # the output

  with pytest.raises(AssertionError) as failed:
    run_block(python, checkout)
  message = str(failed.value)
  assert message.startswith("docs/broken.md:9: the python block exited with status 1")
  assert "L.ms_los" in message
  assert "AttributeError" in message and "line 11" in message  # the page's own line


def test_the_checker_stops_a_hanging_block_and_its_children(tmp_path):
  page = tmp_path / "hang.md"
  page.write_text("```bash runnable\nsleep 120 &\nsleep 120\n```\n")
  checkout = make_checkout(tmp_path / "checkout", tmp_path)
  with pytest.raises(AssertionError, match=r"^hang.md:1: the bash block timed out after 1 s"):
    run_block(runnable_blocks(page, tmp_path)[0], checkout, timeout=1)


def test_a_block_reaching_for_gcloud_fails_even_if_it_ignores_the_error(tmp_path):
  page = tmp_path / "cloud.md"
  page.write_text("```bash runnable\ngcloud compute tpus list || true\n```\n")
  checkout = make_checkout(tmp_path / "checkout", tmp_path)
  with pytest.raises(AssertionError, match="called 'gcloud compute tpus list'"):
    run_block(runnable_blocks(page, tmp_path)[0], checkout)


def test_collecting_follows_commonmark_fences(tmp_path):
  page = tmp_path / "fences.md"
  page.write_text(textwrap.dedent("""\
      ````markdown
      ```bash runnable
      echo inside a longer fence: an example, not a block
      ```
      ````

      ~~~python runnable
      print("tildes")
      ~~~

        ```bash runnable
        echo indented
        ```

      ```bash
      echo illustrative
      ```
      """))
  blocks = runnable_blocks(page, tmp_path)
  assert [(b.line, b.language, b.code) for b in blocks] == [
      (7, "python", 'print("tildes")\n'), (11, "bash", "echo indented\n")]

  page.write_text("```sh runnable\necho hi\n```\n")
  with pytest.raises(ValueError, match="fences.md:1: only python and bash"):
    runnable_blocks(page, tmp_path)
  page.write_text("text\n```python runnable\nprint(1)\n")
  with pytest.raises(ValueError, match="fences.md:2: the fenced block opened here is never"):
    runnable_blocks(page, tmp_path)


# ------------------------------------------------------------------------------ links

_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def _prose_lines(text: str):
  """``(line number, line)`` of the lines outside fenced blocks."""
  fence = None
  for number, line in enumerate(text.splitlines(), start=1):
    m = _FENCE.match(line)
    if fence is None:
      if m:
        fence = m["fence"]
      else:
        yield number, line
    elif m and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) \
        and not m["info"].strip():
      fence = None


def heading_anchors(text: str) -> set[str]:
  """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to
  hyphens, repeats numbered."""
  anchors, seen = set(), {}
  for _, line in _prose_lines(text):
    m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m[1]).replace("`", "").lower()
    slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def broken_links(path: pathlib.Path, root: pathlib.Path = REPO) -> list[str]:
  """The relative links of ``path`` whose file, or heading anchor in a Markdown file,
  does not exist."""
  text = path.read_text(encoding="utf-8")
  broken = []
  for number, line in _prose_lines(text):
    line = _INLINE_CODE.sub("code", line)
    targets = _LINK.findall(line) + _REFERENCE.findall(line)
    for target in targets:
      if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto:, ...
        continue
      file_part, _, anchor = target.partition("#")
      resolved = (path.parent / file_part).resolve() if file_part else path
      where = f"{path.relative_to(root).as_posix()}:{number}: {target}"
      if not resolved.exists():
        broken.append(f"{where} (no such file)")
      elif anchor and resolved.suffix == ".md" and \
          anchor not in heading_anchors(resolved.read_text(encoding="utf-8")):
        broken.append(f"{where} (no heading with that anchor)")
  return broken


def test_relative_links_resolve():
  broken = [b for path in doc_files() for b in broken_links(path)]
  assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_finds_missing_files_and_anchors(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The S/P/N ablations\n")
  page = tmp_path / "README.md"
  page.write_text(textwrap.dedent("""\
      # Title
      [fine](docs/a.md) [fine too](docs/a.md#the-spn-ablations) [web](https://x.org/y)
      [gone](docs/b.md) and [bad anchor](docs/a.md#ablations) and [here](#title)
      `[not a link](nowhere.md)`
      ```
      [in code](nowhere.md)
      ```
      """))
  assert broken_links(page, tmp_path) == [
      "README.md:3: docs/b.md (no such file)",
      "README.md:3: docs/a.md#ablations (no heading with that anchor)"]
