"""What rank does a fine-tune need? Each skill model's score, full fine-tune vs the LoRA
adapter extracted from it at several ranks (the table in docs/extract.md).

    python benchmarks/extract_skills.py [--ranks 1,2,4,8,16,32] [--energies 0.5,0.9]
                                        [--skills math,code,chat] [--out FILE.json]

For each fine-tune of examples/models (see docs/evaluate.md) and each rank: the adapter
is extracted as `mergelang extract` does (the same script, run in this process), loaded
onto the base with PEFT (`PeftModel.from_pretrained`, then `merge_and_unload`) and scored
with mergelang.eval on the skill's task file (200 held-out prompts, exact match and the
answer's mean per-token log-likelihood). Printed as a table; --out writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import mergelang
from mergelang.eval import score
from mergelang.extraction.command import script

ROOT = Path(__file__).resolve().parent.parent
MODELS, TASKS = ROOT / "examples" / "models", ROOT / "examples" / "tasks"


def adapted(base: Path, adapter: Path) -> torch.nn.Module:
    """The base with the adapter merged in, as PEFT loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def row(skill: str, label: str, result: dict, report: dict | None, size: int | None) -> dict:
    return {"skill": skill, "adapter": label, "exact_match": result["exact_match"],
            "loglik": result["loglik"],
            "error": None if report is None else report["overall_error"],
            "ranks": None if report is None else sorted({t["rank"] for t in report["tensors"]}),
            "parameters": None if report is None else report["parameters"], "bytes": size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4,8,16,32")
    p.add_argument("--energies", default="0.5,0.9")
    p.add_argument("--skills", default="math,code,chat")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(1)
    base = MODELS / "base"
    rows: list[dict] = []
    forms = [(f"rank {r}", int(r), None) for r in a.ranks.split(",") if r] + \
        [(f"energy {e}", None, float(e)) for e in a.energies.split(",") if e]
    with tempfile.TemporaryDirectory() as tmp:
        for skill in a.skills.split(","):
            tasks = [TASKS / f"{skill}.jsonl"]
            for label, model in (("base", base), ("full fine-tune", MODELS / skill)):
                rows.append(row(skill, label, score(model, tasks)[0], None, None))
                print(json.dumps(rows[-1]), flush=True)
            for label, rank, energy in forms:
                out = Path(tmp) / f"{skill}-{label.replace(' ', '')}"
                program = mergelang.compile(script(str(MODELS / skill), str(base), rank, energy))
                program.run(out)
                report = json.loads((out / "extraction.json").read_text())
                result = score(adapted(base, out), tasks, like=base)[0]
                size = (out / "adapter_model.safetensors").stat().st_size
                rows.append(row(skill, label, result, report, size))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| skill | model | exact match | loglik | rel. error | ranks | adapter KB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = "-" if r["ranks"] is None else (
            str(r["ranks"][0]) if len(r["ranks"]) == 1 else f"{r['ranks'][0]}-{r['ranks'][-1]}")
        lines.append(f"| {r['skill']} | {r['adapter']} | {r['exact_match']:.3f} | "
                     f"{r['loglik']:.2f} | "
                     f"{'-' if r['error'] is None else format(r['error'], '.3f')} | {ranks} | "
                     f"{'-' if r['bytes'] is None else format(r['bytes'] / 1e3, '.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
