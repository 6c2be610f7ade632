"""The sealed UDP leg's AEAD framing (engine.udpseal): what opens, and every cause of a
drop (truncated, foreign, forged, replayed), the replay window, rekeying, stale flow ids."""
from __future__ import annotations

import struct
import time

from scistream.data import wankeys
from scistream.data.engine import udpseal
from scistream.data.engine.udp import zero_counters
from scistream.data.engine.udpseal import OVERHEAD, WINDOW, Sealer, master_key


def pair(rekey_after: int = udpseal.REKEY_AFTER) -> tuple[Sealer, Sealer]:
    key = master_key(wankeys.new_secret())
    return Sealer(key, "CONS", rekey_after), Sealer(key, "PROD", rekey_after)


def test_both_directions_open_and_are_bound_to_their_flow():
    cons, prod = pair()
    c = zero_counters()
    flow = cons.new_flow()
    wire = cons.seal_state(flow, b"hello")
    assert len(wire) == len(b"hello") + OVERHEAD and b"hello" not in wire
    keys, plain = prod.open(None, wire, c)
    assert plain == b"hello"
    back = prod.seal_state(keys, b"reply")
    assert cons.open(flow, back, c)[1] == b"reply"
    # a reply sealed for another flow does not open on this one
    other = cons.new_flow()
    keys2, _ = prod.open(None, cons.seal_state(other, b"x"), c)
    assert cons.open(flow, prod.seal_state(keys2, b"y"), c) is None
    assert c["drops_forged"] == 1
    # the PROD side's own direction does not open as the CONS side's (keys per direction)
    assert prod.open(keys, prod.seal_state(keys, b"z"), c) is None
    assert c["drops_forged"] == 2


def test_drops_by_cause():
    cons, prod = pair()
    c = zero_counters()
    flow = cons.new_flow()
    wire = cons.seal_state(flow, b"payload")
    assert prod.open(None, wire[:OVERHEAD - 1], c) is None
    assert prod.open(None, b"\x02" + wire[1:], c) is None
    assert c["drops_truncated"] == 2
    foreign, _ = pair()
    assert prod.open(None, foreign.seal_state(foreign.new_flow(), b"x"), c) is None
    assert c["drops_foreign"] == 1
    forged = bytearray(wire)
    forged[-1] ^= 1
    assert prod.open(None, bytes(forged), c) is None
    header_forged = bytearray(wire)
    header_forged[20] ^= 1          # the counter: authenticated as associated data
    assert prod.open(None, bytes(header_forged), c) is None
    assert c["drops_forged"] == 2
    keys, plain = prod.open(None, wire, c)
    assert plain == b"payload"
    assert prod.open(keys, wire, c) is None         # the same datagram again
    assert prod.open(None, wire, c) is None         # again, as from another source
    assert c["drops_replayed"] == 2
    assert not any(v for k, v in c.items() if k not in ("drops_truncated", "drops_foreign", "drops_forged",
                                                        "drops_replayed"))


def test_replay_window_takes_reordering_and_refuses_what_is_too_old():
    cons, prod = pair()
    c = zero_counters()
    flow = cons.new_flow()
    wires = [cons.seal_state(flow, b"%d" % i) for i in range(WINDOW + 10)]
    keys, _ = prod.open(None, wires[5], c)
    for i in (3, 4, 0, 2, 1, 6):                  # late ones within the window
        assert prod.open(keys, wires[i], c)[1] == b"%d" % i
    assert prod.open(keys, wires[3], c) is None
    assert prod.open(keys, wires[WINDOW + 9], c)[1] == b"%d" % (WINDOW + 9)
    assert prod.open(keys, wires[7], c) is None     # now behind the window
    assert prod.open(keys, wires[12], c)[1] == b"12"   # still inside it
    assert c["drops_replayed"] == 2 and c["drops_forged"] == 0


def test_rekey_before_the_counter_runs_out():
    cons, prod = pair(rekey_after=3)
    c = zero_counters()
    flow = cons.new_flow()
    keys = None
    epochs = []
    held = b""
    for i in range(10):
        wire = cons.seal_state(flow, b"m%d" % i)
        epochs.append(struct.unpack_from("!H", wire, 13)[0])
        if i == 4:              # held back: it arrives after the next epoch began
            held = wire
            continue
        keys, plain = prod.open(keys, wire, c)
        assert plain == b"m%d" % i
    assert epochs == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert keys.recv.epoch == 3
    assert prod.open(keys, held, c) is None       # an old epoch's datagram: refused
    assert c["drops_replayed"] == 1 and c["drops_forged"] == 0
    # the last epoch: the flow refuses to seal rather than reuse a key
    flow.send.epoch = udpseal.MAX_EPOCH
    flow.send.counter = 3
    assert cons.seal_state(flow, b"x") is None


def test_stale_and_ended_flow_ids_are_refused():
    cons, prod = pair()
    c = zero_counters()
    flow = cons.new_flow()
    flow.flow_id = struct.pack("!I", int(time.time() - udpseal.FRESH - 5)) + flow.flow_id[4:]
    assert prod.open(None, cons.seal_state(flow, b"old"), c) is None
    assert c["drops_replayed"] == 1
    fresh = cons.new_flow()
    first = cons.seal_state(fresh, b"a")
    keys, _ = prod.open(None, first, c)
    prod.forget(keys)                             # the flow idled out at PROD
    assert prod.open(None, first, c) is None      # a recording of it cannot open it again
    assert c["drops_replayed"] == 2
