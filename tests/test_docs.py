"""Every ```python block of README.md and docs/*.md runs as written, on CPU.

How blocks run: the blocks of one page run in page order in ONE fresh Python process (a per-page cumulative
namespace: a block may use the names an earlier block of the same page defined; pages never share anything),
with the repository root as the working directory, Hugging Face offline, CUDA hidden, denormals flushed, and a
limit of BLOCK_TIMEOUT_S seconds per block. Each block is one test case, named `PAGE:LINE` (the line of its
opening fence); a failure shows the traceback with the page's own line numbers.

A block that cannot run here (a cluster, a GPU, a network endpoint) is marked on the line before its fence with

    <!-- skip: needs 2 nodes with 8 GPUs each -->

and is reported as skipped with that reason. Blank lines may sit between the marker and the fence.

Also: every relative link of those pages points to an existing file.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK_TIMEOUT_S = 600  # a safety net on a shared, loaded machine, not a speed check
_FENCE_OPEN = re.compile(r"^(?P<indent>\s*)```python\s*$")
_FENCE_CLOSE = re.compile(r"^\s*```\s*$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str  # dedented, padded with blank lines so that its line numbers are the page's
    skip_reason: str | None


def doc_pages(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def extract_blocks(text: str, page: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with the skip reason of the marker before each (if any)."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        if opening is None:
            index += 1
            continue
        start = index
        index += 1
        body = []
        while index < len(lines) and not _FENCE_CLOSE.match(lines[index]):
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"{page}:{start + 1}: ```python block is never closed")
        index += 1  # the closing fence
        previous = start - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        marker = _SKIP.match(lines[previous]) if previous >= 0 else None
        code = "\n" * (start + 1) + textwrap.dedent("\n".join(body)) + "\n"
        blocks.append(Block(page, start + 1, code, marker.group("reason") if marker else None))
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in doc_pages() if path.is_file()
            for block in extract_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]


# --- the runner: `python tests/test_docs.py PAGE RESULTS.jsonl` runs the page's blocks, one result line each ------

def run_page_blocks(page: str, results_path: str) -> None:
    import signal
    import traceback

    os.chdir(REPO)
    try:
        import torch

        torch.set_flush_denormal(True)
    except ImportError:
        pass

    def on_timeout(signum, frame):
        raise TimeoutError(f"block ran longer than {BLOCK_TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, on_timeout)
    namespace = {"__name__": "__main__"}
    with open(results_path, "a", encoding="utf-8") as results:
        for block in extract_blocks((REPO / page).read_text(encoding="utf-8"), page):
            if block.skip_reason is not None:
                continue
            error = None
            signal.alarm(BLOCK_TIMEOUT_S)
            try:
                exec(compile(block.code, page, "exec"), namespace)
            except BaseException:  # noqa: B036 - SystemExit too: a block must not end the page's process
                error = traceback.format_exc()
            finally:
                signal.alarm(0)
            results.write(json.dumps({"line": block.line, "error": error}) + "\n")
            results.flush()


@lru_cache(maxsize=None)
def page_results(page: str, tmp_dir: str) -> dict[int, str | None]:
    """Runs the page once; {fence line: traceback or None}. A block missing from it never finished."""
    results_path = Path(tmp_dir) / (page.replace("/", "_") + ".jsonl")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
    blocks = [b for b in extract_blocks((REPO / page).read_text(encoding="utf-8"), page) if b.skip_reason is None]
    try:
        completed = subprocess.run([sys.executable, __file__, page, str(results_path)], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S * len(blocks) + 60)
        output = completed.stdout[-4000:] + completed.stderr[-4000:]
    except subprocess.TimeoutExpired as expired:
        output = f"the page's process timed out after {expired.timeout} s"
    results = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            record = json.loads(line)
            results[record["line"]] = record["error"]
    for block in blocks:
        results.setdefault(block.line, f"the block did not finish (the process died or timed out):\n{output}")
    return results


BLOCKS = all_blocks()


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("doc_blocks"))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}:{b.line}" for b in BLOCKS])
def test_python_block_runs(block, results_dir):
    if block.skip_reason is not None:
        pytest.skip(f"{block.page}:{block.line}: {block.skip_reason}")
    results = page_results(block.page, results_dir)
    error = results[block.line]
    if error is not None:
        earlier = [line for line, err in sorted(results.items()) if line < block.line and err is not None]
        note = f" (earlier blocks of this page failed too: lines {earlier})" if earlier else ""
        pytest.fail(f"{block.page}:{block.line}: the block fails{note}:\n{error}", pytrace=False)


def test_blocks_are_found_with_their_skip_reasons():
    page = textwrap.dedent("""\
        Intro.

        ```python
        x = 1
        ```

        <!-- skip: needs a GPU -->

        ```python
        import torch
        torch.ones(1, device="cuda")
        ```

        ```bash
        make test
        ```

        1. In a list:

           ```python
           y = x + 1
           ```
        """)
    blocks = extract_blocks(page, "page.md")
    assert [(b.line, b.skip_reason) for b in blocks] == [(3, None), (9, "needs a GPU"), (20, None)]
    assert blocks[2].code.splitlines()[20] == "y = x + 1"  # dedented, at its page line (index 20 = line 21)
    namespace = {}
    exec(compile(blocks[0].code, "page.md", "exec"), namespace)
    exec(compile(blocks[2].code, "page.md", "exec"), namespace)
    assert namespace["y"] == 2  # cumulative within a page
    with pytest.raises(ValueError, match="page.md:1: ```python block is never closed"):
        extract_blocks("```python\nx = 1\n", "page.md")


_LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", [p for p in doc_pages() if p.is_file()], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # links, not code
    broken = [match.group("target") for match in _LINK.finditer(text)
              if "://" not in match.group("target") and not match.group("target").startswith("mailto:")
              and not (page.parent / match.group("target")).exists()]
    assert broken == [], f"{page.relative_to(REPO)}: links to missing files: {broken}"


def test_readme_and_docs_have_python_blocks():
    pages = {block.page for block in BLOCKS}
    assert "README.md" in pages
    assert any(page.startswith("docs/") for page in pages)


if __name__ == "__main__":
    run_page_blocks(sys.argv[1], sys.argv[2])


def test_training_page_lists_every_option_as_the_config_defines_it():
    from rpo.train.config import options_table

    assert options_table() in (REPO / "docs" / "training.md").read_text(), (
        "docs/training.md's option table is stale: paste rpo.train.config.options_table()")
