"""Four outer-state averagers on real DHTs, for tests/integration/test_diloco.py: which member a state download
comes from, with and without ``sources``, and which ones the keeper's consensus (consensus.py) picks.

"newest" declares the highest priority and serves a state of its own, while it tells those who ask
(rpc_state_sample) that it holds the honest one; "honest-a" and "honest-b" serve the same state (up to float
rounding); "me" downloads, last after excluding "newest" (as caught poisoning). Prints one JSON line with what
each download returned."""

from __future__ import annotations

import json

import torch

from hivefold.averaging import agreement, consensus
from hivefold.averaging.members import OuterStateAverager
from hivefold.dht import SwarmDHT

PREFIX = "sources-test"


def main() -> None:
    first = SwarmDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    dhts = [first] + [SwarmDHT(initial_peers=[str(m) for m in first.get_visible_maddrs()],
                               host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True) for _ in range(3)]
    names = ("newest", "honest-a", "honest-b", "me")
    values = {"newest": 5.0, "honest-a": 1.0, "honest-b": 1.0 + 1e-7, "me": 0.0}
    averagers = {}
    for name, dht, priority in zip(names, dhts, (9.5, 3.25, 3.125, 3.0), strict=True):
        def state(name=name):
            return {"epoch": 3, "who": name}, [torch.full((64,), values[name]), torch.zeros(64)]
        averager = OuterStateAverager(averaged_tensors=[torch.zeros(64)], dht=dht, start=True, prefix=PREFIX,
                                      state_fn=state, min_matchmaking_time=1.0, request_timeout=1.0)
        averager.state_sharing_priority = priority
        told = values["honest-a"] if name == "newest" else values[name]  # "newest" lies about what it holds
        averager.publish_sample(3, agreement.sample([torch.full((64,), told)]))
        averagers[name] = averager
    me = averagers["me"]
    ids = {name: str(dht.peer_id) for name, dht in zip(names, dhts, strict=True)}
    who_is = {v: k for k, v in ids.items()}

    def who(sources=None):
        for _ in range(40):  # until every averager has declared its state in the DHT
            loaded = me.load_state_from_peers(timeout=5.0, sources=sources)
            if sources == []:
                return None
            if loaded is not None and (sources is not None or loaded[0]["who"] == "newest"):
                return loaded[0]["who"]
        return None

    def download(peer):
        loaded = me.load_state_from_peers(timeout=5.0, sources=[peer])
        return (loaded[0]["epoch"], loaded[1], loaded[0]["who"]) if loaded else (None, None, None)

    out = {"any": who(), "consensus": who(sources=[ids["honest-a"]]), "nobody": who(sources=[])}
    candidates = consensus.declared(dhts[3], PREFIX, ids["me"])
    out["declared"] = [who_is.get(p) for p in candidates]
    answers = me.state_samples(candidates, timeout=3.0)
    out["answered"] = sorted(who_is[p] for p in answers)
    got = consensus.download_agreed(candidates, lambda peers: me.state_samples(peers, timeout=3.0), download,
                                    n_params=1)
    out["keeper"] = got[2] if got else None
    me.exclude(ids["newest"])  # as the owner does for a member another averager or check caught (guarded.py)
    loaded = me.load_state_from_peers(timeout=5.0)
    out["after_exclude"] = loaded[0]["who"] if loaded else None
    print(json.dumps(out), flush=True)
    for averager in averagers.values():
        averager.shutdown()
    for dht in dhts:
        dht.shutdown()


if __name__ == "__main__":
    main()
