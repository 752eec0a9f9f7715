"""The same per-tensor plan on a Dask cluster: `mergelang run ... --scheduler ADDRESS` or
`--workers N`.

One machine's disk and cores bound a merge of several large models; the tensors of a merge
are independent, so the work splits into tasks that Dask distributed places on workers and
retries when a worker is lost. Nothing here schedules, transports or pools: Dask does.
A run goes like this (docs/cluster.md has the user's side):

1. The client compiles and plans the script as a local run does (headers only), lays out
   the output shards (io.write.ShardedWriter, creating none), and opens the output's
   temporary folder (io.hf.OutputFolder), which every worker must see at the same path.
2. Model-wide reductions (`trim(d, k, "model")`, `norm(d, scope="model")`) are swept in
   rounds. In each, a task feeds a fresh reduction with a contiguous run of the tensors in
   the plan's order and sends back its `Reduction.partial()`; the client `merge`s the
   partials in that order (the placement of ties depends on it), finishes the sweep, and
   sends the combined partials with the next round, so each task's reduction starts where
   the whole model's stands. What each tensor needs of the result (a threshold and its
   share of the ties, a norm) goes to the task that writes that tensor.
3. A write task per output shard, or per group of whole shards up to `task_size` bytes,
   compiles and plans the script itself, runs the ordinary executor on its tensors, and
   writes its shards in a folder of its own inside the temporary folder; once they are
   complete it renames them into the temporary folder. A task that is run again (its
   worker died) starts its folder afresh, so a shard lands whole or not at all.
4. The client writes the index, config, tokenizer files and model card, and OutputFolder
   moves the folder into place; on an error or an interrupt it deletes it, partial shards
   included.

A task carries only small, plain data: the script's text and path, the parameter values
and options, the tensor names and the shard layout. Each worker opens the models itself
(file maps never travel), so workers must see the same files at the same paths. The
result does not depend on the number of workers, the partition or the order tasks finish
in: same bytes as a local run.

The modules: `tasks` (what the workers run, and the plain data a task carries),
`client` (the `Cluster`: plans the tasks, runs them, combines the partials, finishes
the folder), `pool` (tasks submitted, answered as they finish, cancelled together),
`sweep` (a sweep's points scored on the workers) and `connect` (reaching a scheduler,
or starting a local cluster). dask is imported only when a `Cluster` is made, so
`import mergelang` never needs it.
"""

from .client import Cluster

__all__ = ["Cluster"]
