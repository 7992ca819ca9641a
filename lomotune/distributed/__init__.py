"""Several processes, one file for each part (import the file you need; nothing here):

- `launch.py`: starting a run's processes and ending them: the elastic launcher, whether
  this process is one of its workers (or torchrun's), a worker's error handed to the
  launcher, a worker's end with its launcher, a lost peer named in one line.
- `checks.py`: why a recipe cannot run on N processes (GPUs missing, a torch whose FSDP2
  cannot sum, a batch too small to split), checked before any process starts.
- `group.py`: the process group (`join`, `leave`), this process's place in it (`World`),
  and the collectives the run makes between ranks: rank 0 deciding for all
  (`share_from_main`), a flag of any rank, every rank's numbers or objects.
- `sharding.py`: what each method does with N processes: FSDP2 wrapping (`distribute`),
  the whole model gathered for generation, its full state dict for saving.
- `rows.py`: helpers on sharded tensors (DTensor) that the engines and checkpoints use:
  a rank's local part, the whole tensor, per-row state cut or gathered as the weights
  are, gradients and statistics summed over ranks. No process group of their own.
- `loss.py`: `DataParallelLoss`, each rank's share of a batch and the global loss.
"""
