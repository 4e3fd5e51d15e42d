"""fedrun: federated learning on torch.distributed.

Vocabulary, used the same way in every module:

- *round*: one cycle of broadcast, local training, gather and aggregation; numbered from 1.
- *server*: rank 0. It owns the global weights, plans rounds, aggregates, evaluates,
  checkpoints and reports.
- *device*: ranks 1..N, one data holder each (a hospital, a lab...), named in the config.
- *rank*: a process's place in the torchrun group; device k is rank k.
- *shard*: the part of the training set a device holds; it never leaves that device.
- *update*: a device's flat weights after local training, sent back to the server.
- *mask*: leaving an update out of aggregation (failed, timed out, rejected, quarantined),
  with the reason recorded in the round's record.
"""

__version__ = "0.1.0"
