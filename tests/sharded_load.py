"""A sharded run's setup on each process of `torchrun --nproc-per-node 2 tests/sharded_load.py
OUT` (gloo, the tiny model in bf16): what the model held on the device when `distribute`
got it, and each rank's shards and gradient-reduction dtypes after it, written to OUT for
tests/test_distributed.py to compare with the model's own weights."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lomotune import train
from lomotune.distributed import group, sharding
from lomotune.recipe import load_recipe

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world = group.World(rank=rank, local_rank=rank, size=2)
    recipe = load_recipe(
        Path(__file__).parents[1] / "lomotune" / "recipes" / "tiny.yaml",
        ["model.precision=bf16", "hardware.gpus=0", "data.num_examples=8",
         f"training.output_dir={out / 'run'}"],
    )  # fmt: skip
    seen = {}
    real_distribute = sharding.distribute

    def distribute(model, *args, **kwargs):
        # Bytes of the model's own tensors on a device (not on meta) when sharding starts.
        tensors = [*model.parameters(), *model.buffers()]
        seen["bytes_on_device"] = sum(t.nbytes for t in tensors if not t.is_meta)
        return real_distribute(model, *args, **kwargs)

    sharding.distribute = distribute
    run = train.setup(recipe, out / "run", None, torch.device("cpu"), live=False, world=world)
    model = run.loaded.model
    shards = {n: p.to_local().contiguous() for n, p in model.named_parameters()}
    save_file(shards, out / f"rank{rank}.safetensors")
    from torch.distributed.fsdp import FSDPModule

    groups = [
        m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)
    ]
    seen["reduce_dtypes"] = sorted({str(g.mp_policy.reduce_dtype) for g in groups if g is not None})
    seen["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
