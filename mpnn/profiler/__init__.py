"""Op-level profiling, shaped after torch.profiler:

    with mpnn.profiler.profile(record_shapes=True) as prof:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
    print(prof.table(sort_by="self_time", row_limit=20))     # also prof.key_averages().table(...)
    prof.export_chrome_trace()                               # <run dir>/ops-<rank>.trace.json under mpnn launch

Every op's forward (each function of the op set, nested calls included) and every node's backward is timed while
the block runs, with its calls and, with ``record_shapes=True``, its input shapes. Outside the block nothing of it
runs: the switch (``mpnn.core.optrace``) swaps the op functions and ``Node.apply`` for timed ones on entry and puts
the same objects back on exit.
"""

from mpnn.profiler.profile import EventAverage, KeyAverages, OpEvent, profile

__all__ = ["profile", "KeyAverages", "EventAverage", "OpEvent"]
