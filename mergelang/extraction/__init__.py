"""LoRA extraction: a fine-tune's (or any merge's) delta, compressed to a PEFT adapter.

`output extract_lora(x, rank=32)` makes the delta `x` an adapter instead of a model:
lower records the form (form.py), plan and execute compute `x` tensor by tensor as for
any output, and the adapter sink (io/adapter.py) factorises each finished 2-D weight
(svd.py) and writes `adapter_config.json` + `adapter_model.safetensors`.
`mergelang extract FT --base BASE --rank R -o ADAPTER` (command.py) compiles exactly that
script and runs it.

Nothing is imported here: lower imports form.py while it is itself being imported.
"""
