"""How peers combine their work, one module per mode behind one small interface.

``make_averaging(spec, model, dht, trains=...)`` returns the run's mode; peers (``trains=True``)
and the keeper (``trains=False``: follows the swarm and serves its state, never trains) both use:

- ``step(samples)``: after ``backward()`` on gradients summed over ``samples`` sequences;
- ``epoch`` (this member's swarm step) and ``global_epoch`` (the swarm's, as far as it knows);
- ``load_state_from_peers(timeout) -> bool``: one bounded attempt to take the newest state; a download that
  outlasts ``timeout`` is no state (False), never an exception: hivemind gives every member it tries the whole
  timeout and then raises from the future, which happens whenever dead or frozen members are still listed
  in the DHT, or this process was itself suspended mid-download (a laptop lid, SIGSTOP);
- ``state_dict()`` / ``load_state_dict()``: what a checkpoint holds besides the model;
- ``settle(final=False)`` (land work in flight before leaving; ``final``: the run is over, average what is
  left), ``stats()`` and ``shutdown()``;
- ``take_flags()``: members its guarded all-reduces caught poisoning since the last call, to report.

``sync`` (``sync.py``): hivemind's Optimizer, gradients all-reduced every swarm step.
``diloco`` (``diloco.py``): local AdamW, an overlapped outer Nesterov step every round.
"""

from __future__ import annotations

import hivemind

from hivefold.model import GPT
from hivefold.spec import RunSpec


def make_averaging(spec: RunSpec, model: GPT, dht: hivemind.DHT, *, client_mode: bool = False, trains: bool = True,
                   swarm_key: bytes | None = None):
    """The run's averaging mode around ``model``; build it in the process's main thread (hivemind needs that).

    Both modes take each step's sample count from the caller, so members may train at any micro-batch.
    With ``swarm_key`` (the coordinator's public key), both modes serve group joins and state downloads only
    to swarm members holding a valid token (hivefold.swarm_access).
    """
    if spec.averaging.mode == "diloco":
        from hivefold.averaging.diloco import DiLoCo

        return DiLoCo(spec, model, dht, client_mode=client_mode, trains=trains, swarm_key=swarm_key)
    from hivefold.averaging.sync import SyncAveraging

    return SyncAveraging(spec, model, dht, client_mode=client_mode, trains=trains, swarm_key=swarm_key)
