"""`mergelang eval` and `mergelang.eval`: the figures are right, the skill models have their
skills, and bad inputs are located errors with exit status 2.

Why an independent decode: batched generation with left padding is easy to get subtly
wrong (a position id off by the padding, a mask that lets a row see its padding), and a
wrong exact-match figure would rank merges wrongly without ever failing loudly. So the
test decodes the same prompts one at a time with `transformers`' own `generate`, no
padding at all, and the two must agree prompt for prompt.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mergelang import MergeError  # noqa: E402
from mergelang.cli import main  # noqa: E402
from mergelang.eval import Inputs, kept_by_finetune, kept_gain, load_tasks, score  # noqa: E402
from mergelang.eval.models import load_model  # noqa: E402
from mergelang.eval.score import greedy, perplexity  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = EXAMPLES / "models"
TASKS = EXAMPLES / "tasks"
SKILLS = ("math", "code", "chat")


def records(skill: str, n: int, seed: int = 0) -> list[dict]:
    lines = (TASKS / f"{skill}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in random.Random(seed).sample(lines, n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tests' own forward passes on one thread, as score() runs a small model (on
    shared cores, two threads made them ten times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded():
    """Each committed model loaded once, as score() loads it."""
    return {m: load_model(MODELS / m) for m in ("base", *SKILLS)}


# ---- the figures are right ---------------------------------------------------------------


def test_exact_match_agrees_with_an_independent_greedy_decode(loaded):
    """Prompts of several lengths, batched with left padding, against transformers'
    generate() on each prompt alone."""
    recs = records("code", 8) + records("math", 4) + records("chat", 4)
    tok = transformers.AutoTokenizer.from_pretrained(MODELS / "code")
    model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / "code").float().eval()
    assert len({len(r["prompt"]) for r in recs}) >= 3  # padding is exercised
    cap = 8
    expected = []
    for r in recs:
        ids = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=cap, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        expected.append(text.split("\n")[0].strip())
    prompts = [tok(r["prompt"])["input_ids"] for r in recs]
    got = [t.split("\n")[0].strip() for t in greedy(loaded["code"], prompts, cap)]
    assert got == expected
    assert sum(g == r["answer"] for g, r in zip(got, recs, strict=True)) >= 5  # the skill shows
    results = score(MODELS / "code", recs, batch_size=5, max_new_tokens=cap)
    for result in results:
        mine = [(g, r) for g, r in zip(expected, recs, strict=True) if r["task"] == result["task"]]
        assert result["n"] == len(mine)
        assert result["exact_match"] == sum(g == r["answer"] for g, r in mine) / len(mine)


def test_batch_size_does_not_change_the_figures(loaded):
    recs = records("math", 6) + records("code", 6)
    from mergelang.eval import score_loaded

    one = score_loaded(loaded["math"], recs, batch_size=1)
    many = score_loaded(loaded["math"], recs, batch_size=7)
    for a, b in zip(one, many, strict=True):
        assert a["exact_match"] == b["exact_match"]
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)


def test_loglik_is_the_mean_per_token_log_likelihood_of_the_answer(loaded):
    rec = records("math", 1)[0]
    model = loaded["math"].model
    ids = [1, *rec["prompt"].encode(), *rec["answer"].encode()]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    start = 1 + len(rec["prompt"])
    expected = sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids))) / (len(ids) - start)
    (result,) = score(MODELS / "math", [rec])
    assert result["loglik"] == pytest.approx(expected, abs=1e-5)


def test_a_state_dict_or_a_model_object_scores_like_its_folder(loaded):
    recs = records("chat", 8)
    from safetensors.torch import load_file

    state = load_file(str(MODELS / "chat" / "model.safetensors"))
    from_folder = score(MODELS / "chat", recs)
    assert score(state, recs, like=MODELS / "base") == from_folder
    model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / "chat").float()
    assert score(model, recs, like=MODELS / "chat") == from_folder


def test_perplexity_over_windows(tmp_path, loaded):
    text = tmp_path / "t.txt"
    text.write_text("kavo is dopel.\n12 13 14 15\n" * 5)
    result = perplexity(MODELS / "base", text, window=16)
    ids = list(text.read_bytes())
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 15):
            window = [1, *ids[start:start + 15]]
            logp = torch.log_softmax(loaded["base"].model(torch.tensor([window])).logits[0], -1)
            total += sum(logp[i - 1, window[i]].item() for i in range(1, len(window)))
            count += len(window) - 1
    assert result["n"] == count == len(ids)
    assert result["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-4)


# ---- the skill models ----------------------------------------------------------------------


def test_each_fine_tune_is_60_points_ahead_of_the_base_on_its_skill(loaded):
    from mergelang.eval import score_loaded

    for skill in SKILLS:
        recs = records(skill, 50, seed=1)
        (base,) = score_loaded(loaded["base"], recs, batch_size=50)
        (tuned,) = score_loaded(loaded[skill], recs, batch_size=50)
        assert tuned["exact_match"] - base["exact_match"] >= 0.6, (skill, base, tuned)
        assert tuned["loglik"] > base["loglik"]


def test_the_task_files_are_the_held_out_split_of_the_training_script():
    spec = importlib.util.spec_from_file_location("train_skills", EXAMPLES / "train_skills.py")
    train_skills = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_skills  # its dataclasses look their module up
    try:
        spec.loader.exec_module(train_skills)
    finally:
        del sys.modules[spec.name]
    skills = train_skills.make_skills(random.Random(train_skills.SEED))
    for name in SKILLS:
        committed = [(r["prompt"], r["answer"]) for r in load_tasks([TASKS / f"{name}.jsonl"])]
        assert committed == skills[name].test
        assert not {p for p, _ in skills[name].test} & {p for p, _ in skills[name].train}


# ---- against ---------------------------------------------------------------------------


def test_kept_gain_is_the_share_of_the_owners_gain():
    scores = {
        "base": {"a": {"exact_match": 0.1}, "b": {"exact_match": 0.0}, "c": {"exact_match": 0.5}},
        "fa": {"a": {"exact_match": 0.9}, "b": {"exact_match": 0.0}, "c": {"exact_match": 0.5}},
        "fb": {"a": {"exact_match": 0.1}, "b": {"exact_match": 0.8}, "c": {"exact_match": 0.52}},
    }
    inputs = Inputs("base", ("fa", "fb"), scores)
    assert inputs.owner("a") == "fa" and inputs.owner("b") == "fb"
    assert inputs.owner("c") is None  # a 2-point gain owns nothing
    assert kept_gain(inputs, "a", 0.5) == pytest.approx(0.5)
    assert kept_gain(inputs, "b", 0.0) == 0.0
    assert kept_gain(inputs, "c", 0.9) is None
    merged = {"a": {"exact_match": 0.7}, "b": {"exact_match": 0.2}, "c": {"exact_match": 0.5}}
    assert kept_by_finetune(inputs, merged) == pytest.approx({"fa": 0.75, "fb": 0.25})


def test_eval_against_prints_the_best_input_and_the_kept_gain(tmp_path, capsys):
    tasks = []
    for skill in ("math", "code"):
        tasks.append(tmp_path / f"{skill}.jsonl")
        tasks[-1].write_text("".join(json.dumps(r) + "\n" for r in records(skill, 12)))
    code = main(["eval", str(MODELS / "math"), "--tasks", *map(str, tasks), "--json",
                 "--quiet", "--against", str(MODELS / "base"), str(MODELS / "math"),
                 str(MODELS / "code")])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    merged = {r["task"]: r for r in rows if r["role"] == "merge"}
    assert set(merged) == {"math", "code"}
    assert {r["role"] for r in rows} == {"merge", "base", "finetune"}
    assert merged["math"]["kept_gain"] == pytest.approx(1.0)  # math against itself
    assert merged["code"]["owner"] == str(MODELS / "code")
    assert merged["code"]["best_input"] == str(MODELS / "code")
    for r in rows:
        assert {"model", "task", "n", "exact_match", "loglik"} <= set(r)


# ---- errors: located, exit status 2 ----------------------------------------------------


def test_a_malformed_line_is_reported_with_its_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t", "prompt": "1+1=", "answer": "2"}\n{"task": "t", "prompt": \n')
    with pytest.raises(MergeError) as caught:
        load_tasks([bad])
    assert f"{bad}:2:" in str(caught.value)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('\n{"task": "t", "prompt": "1+1="}\n')
    with pytest.raises(MergeError, match='missing "answer"') as caught:
        load_tasks([missing])
    assert f"{missing}:2:" in str(caught.value)


@pytest.mark.parametrize("case", ["missing model", "malformed line", "empty file",
                                  "missing task file", "no lm-eval"])
def test_bad_input_exits_2_with_a_clear_message(case, tmp_path, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"task": "t", "prompt": "1+1=", "answer": "2"}\n')
    model, expect = str(MODELS / "base"), ""
    extra: list[str] = []
    if case == "missing model":
        model, expect = str(tmp_path / "nowhere"), "model not found"
    elif case == "malformed line":
        tasks.write_text('{"task": "t", "prompt": "1+1=", "answer": "2"}\n[1, 2]\n')
        expect = f"{tasks}:2:"
    elif case == "empty file":
        tasks.write_text("\n")
        expect = "is empty"
    elif case == "missing task file":
        tasks, expect = tmp_path / "gone.jsonl", "task file not found"
    else:
        if importlib.util.find_spec("lm_eval") is not None:
            pytest.skip("lm-eval is installed")
        extra, expect = ["--lm-eval", "hellaswag"], "needs lm-evaluation-harness"
    assert main(["eval", model, "--tasks", str(tasks), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_score_refuses_a_state_dict_without_like():
    with pytest.raises(MergeError, match="like="):
        score({"w": torch.zeros(1)}, [{"task": "t", "prompt": "a", "answer": "b"}])
