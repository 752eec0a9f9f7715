"""extract_lora under `set vocab`: an adapter goes onto its base as the base is on disk,
so a vocabulary that re-rows the base's embeddings (more rows, or another order) cannot
be held by it (PEFT refuses the saved embedding's shape); that is a located error, and a
vocabulary that leaves the base's rows as they are extracts as usual."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import (
    assert_error,
    assert_nothing_written,
    run,
    write,
    write_tokenized_model,
)

SCRIPT = '''a = model("a")
b = model("b")
set vocab = {vocab}
output extract_lora(b - a, rank=1)
'''


def two_vocabularies(tmp_path: Path) -> None:
    write_tokenized_model(tmp_path / "a", seed=0)
    write_tokenized_model(tmp_path / "b", added=("fish", "bird"), seed=1)


def test_a_union_vocabulary_that_re_rows_the_base_is_refused(tmp_path, capsys):
    two_vocabularies(tmp_path)
    script = write(tmp_path, SCRIPT.format(vocab='"union"'))
    result = run(capsys, script, tmp_path / "adapter")
    assert_error(result, None, "extract_lora(b - a, rank=1)", "set vocab",
                 "13 rows", "the 11 of the base")
    assert_nothing_written(tmp_path / "adapter")


def test_the_base_s_own_vocabulary_extracts(tmp_path, capsys):
    two_vocabularies(tmp_path)
    script = write(tmp_path, SCRIPT.format(vocab="a"))
    result = run(capsys, script, tmp_path / "adapter")
    assert result.code == 0, result.text
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
