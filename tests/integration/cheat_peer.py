"""A cheating volunteer, for tests and benchmarks: the real ``hivefold peer``, except that it never trains. For
each shard it runs forward passes only (a third of the work) at the state it holds, reports those losses, and
keeps and commits to its states exactly as an honest peer does, so that it answers every verification
challenge with a well-formed proof of the training it did not do.

    python -m tests.integration.cheat_peer peer --coordinator ... (the arguments of ``hivefold peer``)
"""

import sys
import time

import numpy as np
import torch

from peer.trainer import ShardResult, Trainer


def _forward_only(self, sequences, stop, on_batch=None, pause=None, recorder=None) -> ShardResult:
    result, t0 = ShardResult(), time.perf_counter()
    params = list(self.model.parameters())
    inner = getattr(self.averaging, "inner", None)
    mb = self.micro_batch
    with torch.no_grad():
        for i, start in enumerate(range(0, len(sequences), mb)):
            if stop.is_set():
                result.interrupted = True
                return result
            if recorder is not None:
                recorder.before_batch(i, params, inner)
                recorder.record_lr(inner)
            block = torch.from_numpy(sequences[start:start + mb].astype(np.int64))
            _, loss = self.model(block[:, :-1], block[:, 1:])
            result.losses.append((float(loss), self.averaging.epoch))
            result.samples += len(block)
            if on_batch is not None:
                on_batch(len(block))
    result.compute_seconds = time.perf_counter() - t0
    if recorder is not None:
        recorder.finish(params)
        result.proof_digests = recorder.digests([])
    return result


Trainer.train_shard = _forward_only

if __name__ == "__main__":
    from hivefold.cli import main

    sys.exit(main())
