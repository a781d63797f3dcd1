"""Three outer-state averagers on real DHTs, for tests/integration/test_diloco.py: which member a state download
comes from, with and without ``sources``. Prints one JSON line: the metadata each download returned."""

from __future__ import annotations

import json

import torch

from hivefold.averaging.members import OuterStateAverager
from hivefold.dht import SwarmDHT


def main() -> None:
    first = SwarmDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    dhts = [first] + [SwarmDHT(initial_peers=[str(m) for m in first.get_visible_maddrs()],
                               host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True) for _ in range(2)]
    averagers = []
    for name, dht, priority in zip(("newest", "consensus", "me"), dhts, (9.5, 3.25, 3.25), strict=True):
        def state(name=name):
            return {"epoch": 3, "who": name}, [torch.zeros(4), torch.zeros(4)]
        averager = OuterStateAverager(averaged_tensors=[torch.zeros(4)], dht=dht, start=True, prefix="sources-test",
                                      state_fn=state, min_matchmaking_time=1.0, request_timeout=1.0)
        averager.state_sharing_priority = priority
        averagers.append(averager)
    me, ids = averagers[2], {a: str(d.peer_id) for a, d in zip(("newest", "consensus"), dhts, strict=False)}

    def who(**kwargs):
        for _ in range(40):  # until every averager has declared its state in the DHT
            loaded = me.load_state_from_peers(timeout=5.0, **kwargs)
            if loaded is not None and (kwargs.get("sources") is not None or loaded[0]["who"] == "newest"):
                return loaded[0]["who"]
            if kwargs.get("sources") == []:
                return None
        return None

    print(json.dumps({"any": who(), "consensus": who(sources=[ids["consensus"]]), "nobody": who(sources=[])}),
          flush=True)
    for averager in averagers:
        averager.shutdown()
    for dht in dhts:
        dht.shutdown()


if __name__ == "__main__":
    main()
