"""Every ```python block of docs/integrations.md runs.

The convention the page follows:

* Each ``## `` section is one test with a fresh namespace; its ```python blocks run in order in
  that namespace (blocks before the first ``## `` heading form a section of their own).
* Hidden setup code sits in an HTML comment right before a block (only blank lines between):
  a line that is exactly ``<!-- setup``, python lines, then a line that is exactly ``-->``.
  It runs in the section's namespace just before that block; it may also check what the
  blocks before it did.
* Other fences (```yaml, ```bash, ...) are not run. Snippets that would train for real are
  made cheap by their setup (a tiny model built in code, one step), never skipped.

A failure names the section, the block's number in it and its first line in the file.
"""

import os
import re
import traceback
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "integrations.md")


@dataclass
class Block:
    line: int  # 1-based line of the block's first code line
    code: str
    setup: Optional[str] = None
    setup_line: int = 0


@dataclass
class Section:
    title: str
    line: int
    blocks: List[Block] = field(default_factory=list)


def parse(text: str) -> List[Section]:
    """The page's sections and their python blocks, each with its setup. Raises ValueError on a
    malformed page (an unclosed fence or comment, a setup comment not followed by a python block)."""
    lines = text.split("\n")
    sections = [Section("(before the first section)", 1)]
    pending = None  # (setup code, its first line) waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            if pending is not None:
                raise ValueError(f"line {pending[1]}: setup comment is not followed by a ```python block")
            sections.append(Section(line[3:].strip(), i + 1))
            i += 1
            continue
        if line.rstrip() == "<!-- setup":
            if pending is not None:
                raise ValueError(f"line {pending[1]}: setup comment is not followed by a ```python block")
            end = _find(lines, i + 1, lambda s: s.rstrip() == "-->", f"line {i + 1}: setup comment never closed")
            pending = ("\n".join(lines[i + 1:end]), i + 2)
            i = end + 1
            continue
        fence = re.match(r"^```(\S*)\s*$", line)
        if fence:
            end = _find(lines, i + 1, lambda s: s.rstrip() == "```", f"line {i + 1}: code fence never closed")
            if fence.group(1) == "python":
                setup, setup_line = pending if pending is not None else (None, 0)
                sections[-1].blocks.append(Block(i + 2, "\n".join(lines[i + 1:end]), setup, setup_line))
                pending = None
            elif pending is not None:
                raise ValueError(f"line {pending[1]}: setup comment is followed by a ```{fence.group(1)} block, "
                                 "not a ```python block")
            i = end + 1
            continue
        if pending is not None and line.strip():
            raise ValueError(f"line {pending[1]}: setup comment is not right before a ```python block "
                             f"(line {i + 1} comes between)")
        i += 1
    if pending is not None:
        raise ValueError(f"line {pending[1]}: setup comment is not followed by a ```python block")
    return [s for s in sections if s.blocks]


def _find(lines, start, pred, message):
    for j in range(start, len(lines)):
        if pred(lines[j]):
            return j
    raise ValueError(message)


def _run(code: str, first_line: int, namespace: dict, what: str) -> None:
    # Leading newlines make the traceback's line numbers those of the file.
    compiled = compile("\n" * (first_line - 1) + code, DOC, "exec")
    error = None
    try:
        exec(compiled, namespace)
    except Exception:
        error = traceback.format_exc()
    if error is not None:
        pytest.fail(f"docs/integrations.md, {what} failed:\n{error}", pytrace=False)


def _sections():
    with open(DOC, encoding="utf-8") as f:
        return parse(f.read())


SECTIONS = _sections()


def run_section(section: Section) -> dict:
    """Runs a section's setups and blocks in order in one fresh namespace and returns it."""
    namespace = {"__name__": f"docs_{re.sub(r'[^0-9a-zA-Z]+', '_', section.title)}"}
    for n, block in enumerate(section.blocks, 1):
        where = f"section '## {section.title}', python block {n} (line {block.line})"
        if block.setup is not None:
            _run(block.setup, block.setup_line, namespace, f"setup of {where}")
        _run(block.code, block.line, namespace, where)
    return namespace


@pytest.mark.parametrize("section", SECTIONS, ids=[s.title for s in SECTIONS])
def test_section_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write output folders
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    run_section(section)


def test_the_page_has_python_blocks_in_the_adapter_sections():
    titles = {s.title for s in SECTIONS}
    assert {"TRL", "Liger"} <= titles, titles


PAGE = """# Title
```python
x = 1
```
## A
<!-- setup
y = 2
-->

```python
z = y + 1
```
```yaml
a: 1
```
## B
```python
w = 3
```
"""


def test_parser_reads_the_convention():
    sections = parse(PAGE)
    assert [s.title for s in sections] == ["(before the first section)", "A", "B"]
    a = sections[1]
    assert len(a.blocks) == 1 and a.blocks[0].setup == "y = 2" and a.blocks[0].code == "z = y + 1"
    assert a.blocks[0].setup_line == 7 and a.blocks[0].line == 11
    assert sections[2].blocks[0].setup is None


@pytest.mark.parametrize("page,match", [
    ("## A\n<!-- setup\nx = 1\n-->\ntext\n```python\ny = x\n```\n", "not right before"),
    ("## A\n<!-- setup\nx = 1\n-->\n```yaml\na: 1\n```\n", "followed by a ```yaml block"),
    ("## A\n<!-- setup\nx = 1\n-->\n", "not followed by a ```python block"),
    ("## A\n<!-- setup\nx = 1\n", "setup comment never closed"),
    ("## A\n```python\nx = 1\n", "code fence never closed"),
])
def test_parser_rejects_malformed_pages(page, match):
    with pytest.raises(ValueError, match=match):
        parse(page)


def test_a_failing_block_names_its_section_and_line():
    section = parse("## S\n```python\nx = 1\n```\n\n```python\nraise RuntimeError('boom')\n```\n")[0]
    with pytest.raises(pytest.fail.Exception, match=r"(?s)section '## S', python block 2 \(line 7\).*boom"):
        run_section(section)


def test_blocks_of_a_section_share_one_namespace_and_sections_do_not():
    first, second = parse("## A\n```python\nx = 1\n```\n```python\nassert x == 1\n```\n"
                          "## B\n```python\nx\n```\n")
    run_section(first)
    with pytest.raises(pytest.fail.Exception, match="NameError"):
        run_section(second)
