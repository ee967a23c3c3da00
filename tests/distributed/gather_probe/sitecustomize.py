"""Records the cross-process gathers of the loss in each training process (test instrumentation).

tests/test_train_accelerate.py puts this directory on PYTHONPATH, so Python imports this module at start-up
in every process that `accelerate launch` starts, and sets ST_VIOMNI_GATHER_LOG. In a worker (RANK set) it
wraps sentence-transformers' ``all_gather_with_grad``, which the loss uses to gather embeddings with
``gather_across_devices``, before st_viomni imports it; each call appends one JSON line to
``$ST_VIOMNI_GATHER_LOG.rank<RANK>``: the world size torch.distributed and accelerate report, the rows this
process contributed, the rows it got back, and whether the other processes' rows are other samples than its own.
"""

import os

if os.environ.get("ST_VIOMNI_GATHER_LOG") and os.environ.get("RANK") is not None:
    import json

    import sentence_transformers.util
    import sentence_transformers.util.distributed
    import torch

    _original = sentence_transformers.util.distributed.all_gather_with_grad

    def _recording_all_gather_with_grad(tensor):
        gathered = _original(tensor)
        from accelerate import PartialState

        rank, rows = torch.distributed.get_rank(), tensor.shape[0]
        own = gathered[rank * rows : (rank + 1) * rows]
        others = torch.cat([gathered[: rank * rows], gathered[(rank + 1) * rows :]])
        state = PartialState()
        record = {
            "rank": rank,
            "torch_world_size": torch.distributed.get_world_size(),
            "accelerate_num_processes": state.num_processes,
            "accelerate_distributed_type": str(state.distributed_type),
            "backend": torch.distributed.get_backend(),
            "rows": rows,
            "gathered_rows": gathered.shape[0],
            "own_rows_in_place": bool(torch.equal(own.detach(), tensor.detach())),
            "other_rows_differ": bool(others.shape[0] == rows and not torch.equal(others.detach(), tensor.detach())),
        }
        with open(f"{os.environ['ST_VIOMNI_GATHER_LOG']}.rank{os.environ['RANK']}", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        return gathered

    sentence_transformers.util.all_gather_with_grad = _recording_all_gather_with_grad
    sentence_transformers.util.distributed.all_gather_with_grad = _recording_all_gather_with_grad
