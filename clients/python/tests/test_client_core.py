"""The ordering/dedup bookkeeping alone (no server): python-socketio may hand events over
out of order (one thread per message) and replays may repeat what was already seen."""

from __future__ import annotations

import random

from herald_client._core import _Core


def ev(seq: int, sid: str = "s") -> dict:
    return {"sessionId": sid, "seq": seq, "status": "PROCESSING", "progress": seq, "timestamp": "t"}


def make():
    actions = []
    core = _Core(actions.append, None)
    core._on_connected()
    return core, actions


def delivered(actions):
    return [a[2].seq for a in actions if a[0] == "event"]


def test_out_of_order_and_duplicates_are_delivered_once_in_order():
    core, actions = make()
    sub, (payload, gen) = core._register("s", None, None, {}, 0, None)
    assert payload == {"sessionId": "s", "lastSeq": 0}
    seqs = list(range(1, 51)) * 2
    random.Random(7).shuffle(seqs)
    for seq in seqs[:30]:  # some arrive before the ack: held back
        core._handle_event("progress", ev(seq))
    assert delivered(actions) == []
    core._handle_ack(sub, gen, {"ok": True, "sessionId": "s", "lastSeq": 50, "epoch": "e1", "recovered": True})
    for seq in seqs[30:]:
        core._handle_event("progress", ev(seq))
    assert delivered(actions) == list(range(1, 51)) and sub.epoch == "e1"


def test_resubscribe_after_reconnect_sends_last_seq_and_epoch():
    core, actions = make()
    sub, (_, gen) = core._register("s", None, None, {}, 0, None)
    core._handle_ack(sub, gen, {"ok": True, "lastSeq": 0, "epoch": "e1"})
    for seq in (1, 2, 3):
        core._handle_event("progress", ev(seq))
    core._on_disconnected()
    [(s, payload, gen2)] = core._on_connected()
    assert payload == {"sessionId": "s", "lastSeq": 3, "epoch": "e1"}
    core._handle_ack(sub, gen, {"ok": True, "lastSeq": 9})  # a stale ack is ignored
    for seq in (2, 3, 4, 5):
        core._handle_event("progress", ev(seq))
    core._handle_ack(sub, gen2, {"ok": True, "lastSeq": 5, "epoch": "e1", "recovered": True})
    assert delivered(actions) == [1, 2, 3, 4, 5]


def test_recovered_false_resyncs_and_continues_after_head():
    core, actions = make()
    sub, (_, gen) = core._register("s", None, None, {}, 1, "old")
    core._handle_event("progress", ev(11))  # live event racing the ack
    core._handle_ack(sub, gen, {"ok": True, "lastSeq": 10, "epoch": "new", "recovered": False})
    assert [a[0] for a in actions] == ["resync", "event"] and actions[0][2] == 10
    assert delivered(actions) == [11] and sub.epoch == "new"


def test_refused_subscribe_and_seqless_errors():
    actions = []
    core = _Core(actions.append, lambda e: None)
    core._on_connected()
    sub, (_, gen) = core._register("s", None, None, {}, 0, None)
    core._handle_ack(sub, gen, {"ok": False, "error": {"code": "RATE_LIMITED", "message": "slow down"}})
    assert sub.error is not None and sub.error.code == "RATE_LIMITED" and "s" not in core.subscriptions
    core._handle_event("error", {"error": "bad", "code": "INVALID_PAYLOAD", "timestamp": "t"})
    assert actions == [("protocol_error", None, {"error": "bad", "code": "INVALID_PAYLOAD", "timestamp": "t"})]
