"""The examples in docs/*.md run, so the documentation cannot drift from the code.

A fenced block runs when the line before its opening fence is an HTML comment:

    <!-- test -->        a ```python block is exec'd in a fresh namespace; a ```merge block
                         is compiled as a script in examples/ (so `model("models/base")`
                         names the example models) and, if it has an `output`, checked
    <!-- test: error TEXT -->
                         a ```merge block must fail with a MergeError whose text holds TEXT

Python blocks run in a temporary folder holding a link to examples/, so they can read
"examples/..." and write output folders without touching the checkout.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mergelang

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"<!-- test(?P<error>: error (?P<text>.*?))? -->\n```(?P<lang>\w+)\n"
                   r"(?P<code>.*?)^```$", re.S | re.M)


def blocks() -> list:
    found = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            found.append(pytest.param(m["lang"], m["code"], m["text"] if m["error"] else None,
                                      id=f"{doc.name}:{line}"))
    return found


def test_the_docs_have_runnable_examples():
    langs = [p.values[0] for p in blocks()]
    assert langs.count("python") >= 10 and langs.count("merge") >= 10
    assert set(langs) == {"python", "merge"}


@pytest.mark.parametrize("lang,code,error", blocks())
def test_doc_example(lang, code, error, tmp_path, monkeypatch):
    if lang == "python":
        (tmp_path / "examples").symlink_to(ROOT / "examples")
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})
        return
    path = ROOT / "examples" / "doc_example.merge"  # only a name: nothing is written there
    if error is None:
        program = mergelang.compile(code, path)
        if program.lowered.output is not None:
            program.check()
        return
    with pytest.raises(mergelang.MergeError) as caught:
        program = mergelang.compile(code, path)
        program.check()
    assert error in caught.value.render()
