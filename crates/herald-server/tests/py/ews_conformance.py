"""EWS conformance: exchangelib 5.6.0 drives a real `herald serve` as an application would.

Usage: ews_conformance.py BASE_URL PRODUCER_KEY MINUTE_SECONDS [SECTION...]
(PRODUCER_KEY `-` when the server runs without authentication; then only `noauth` applies.)

Alice (alice@example.test / alice-pw) and Bob (bob@example.test / bob-pw) are Herald users.
Events are caused through Herald's producer API (POST /v1/events with the producer key). One
EWS "minute" lasts MINUTE_SECONDS on the server under test. Exits non-zero on the first
failed check, printing which.
"""

import base64
import http.server
import os
import queue
import sys
import threading
import time

import requests
import exchangelib
from exchangelib import (
    BASIC,
    DELEGATE,
    UTC,
    Account,
    Build,
    Configuration,
    Credentials,
    FailFast,
    Version,
)
from exchangelib.errors import (
    ErrorAccessDenied,
    ErrorExpiredSubscription,
    ErrorInvalidPullSubscriptionId,
    ErrorInvalidPushSubscriptionUrl,
    ErrorInvalidSubscription,
    ErrorInvalidWatermark,
    ErrorSubscriptionAccessDenied,
    ErrorSubscriptionNotFound,
    UnauthorizedError,
)
from exchangelib.folders import Root
from exchangelib.properties import (
    CopiedEvent,
    CreatedEvent,
    DeletedEvent,
    ModifiedEvent,
    MovedEvent,
    NewMailEvent,
    StatusEvent,
)
from exchangelib.services import SendNotification
from exchangelib.transport import NOAUTH

BASE, PRODUCER_KEY, MINUTE = sys.argv[1], sys.argv[2], float(sys.argv[3])
ENDPOINT = BASE + "/EWS/Exchange.asmx"
# In a cluster: where events are published (another node than the one subscribed on).
PUBLISH_BASE = os.environ.get("HERALD_PUBLISH_BASE", BASE)
ALICE, BOB = "alice@example.test", "bob@example.test"
PASSWORDS = {ALICE: "alice-pw", BOB: "bob-pw"}


def account(user=ALICE, password=None, noauth=False):
    exchangelib.close_connections()
    cfg = Configuration(
        service_endpoint=ENDPOINT,
        credentials=None if noauth else Credentials(user, password or PASSWORDS[user]),
        auth_type=NOAUTH if noauth else BASIC,
        version=Version(build=Build(15, 1, 2507, 6)),
        retry_policy=FailFast(),
        max_connections=4,
    )
    return Account(user, config=cfg, autodiscover=False, access_type=DELEGATE, default_timezone=UTC)


def ews_id(key):
    return "HK" + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def publish(*events):
    r = requests.post(
        PUBLISH_BASE + "/v1/events",
        json={"events": list(events)},
        headers={} if PRODUCER_KEY == "-" else {"Authorization": "Bearer " + PRODUCER_KEY},
        timeout=15,
    )
    check(r.ok, f"publish: {r.status_code} {r.text}")
    return r.json()["watermarks"]


def created(key, parent, object_type="message"):
    return {"key": key, "kind": "object_created", "object_type": object_type, "parent": parent}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def raises(exc, fn, what):
    try:
        fn()
    except exc as e:
        return e
    except Exception as e:  # noqa: BLE001 - report the wrong error type
        raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"{what}: expected {exc.__name__}, nothing raised")


def drain(folder, sid, wm):
    """Every notification until MoreEvents is false, as exchangelib's get_events returns them."""
    return list(folder.get_events(sid, wm))


def events_of(notifications):
    return [e for n in notifications for e in n.events]


# ---------------------------------------------------------------------------------------------


def folders():
    acct = account()
    inbox = acct.inbox  # GetFolder root, then inbox
    check(inbox.id == ews_id(f"{ALICE}/inbox"), f"inbox id {inbox.id}")
    check(acct.root.id == ews_id(ALICE), f"root id {acct.root.id}")
    # Ids are stable across sessions.
    check(account().inbox.id == inbox.id, "inbox id changes between sessions")
    # Another user's mailbox is not Alice's to open.
    from exchangelib.folders import Inbox
    from exchangelib.properties import DistinguishedFolderId, Mailbox

    fid = DistinguishedFolderId(id="inbox", mailbox=Mailbox(email_address=BOB))
    raises(ErrorAccessDenied, lambda: Inbox.resolve(account=acct, folder=fid), "GetFolder on Bob's inbox")
    # A wrong password is refused before anything runs.
    raises(UnauthorizedError, lambda: account(ALICE, "wrong").inbox, "wrong password")


def pull():
    acct = account()
    inbox = acct.inbox
    sid, wm = inbox.subscribe_to_pull(timeout=5)
    check(sid and wm, "subscribe_to_pull returns an id and a watermark")

    # Nothing yet: one notification with a StatusEvent, PreviousWatermark the one given.
    n = drain(inbox, sid, wm)
    check(len(n) == 1 and n[0].previous_watermark == wm, f"empty poll: {n}")
    check([type(e) for e in n[0].events] == [StatusEvent], f"empty poll events: {n[0].events}")
    wm = n[-1].events[-1].watermark

    # Create, modify, move, copy, delete, new mail; an event elsewhere is not seen.
    inbox_key, drafts_key = f"{ALICE}/inbox", f"{ALICE}/drafts"
    m1 = f"{inbox_key}/m1"
    publish(
        created(m1, inbox_key),
        {"key": m1, "kind": "object_modified", "object_type": "message", "parent": inbox_key},
        {"key": inbox_key, "kind": "object_modified", "object_type": "folder", "parent": ALICE, "unread_count": 7},
        {"key": f"{inbox_key}/m9", "kind": "new_mail", "parent": inbox_key},
        created(f"{drafts_key}/elsewhere", drafts_key),
        created(f"{BOB}/inbox/not-alice", f"{BOB}/inbox"),
        {"key": f"{drafts_key}/m1", "kind": "object_moved", "object_type": "message", "parent": drafts_key,
         "old_key": m1, "old_parent": inbox_key},
        {"key": f"{inbox_key}/m2", "kind": "object_copied", "object_type": "message", "parent": inbox_key,
         "old_key": f"{drafts_key}/d1", "old_parent": drafts_key},
        {"key": f"{inbox_key}/m2", "kind": "object_deleted", "object_type": "message", "parent": inbox_key},
        {"key": f"{inbox_key}/m3", "kind": "table_modified", "table": {"event": "changed"}},
    )
    n = drain(inbox, sid, wm)
    check(n[0].previous_watermark == wm, "PreviousWatermark is the watermark given")
    evs = events_of(n)
    kinds = [type(e).__name__ for e in evs]
    check(
        kinds == ["CreatedEvent", "ModifiedEvent", "ModifiedEvent", "NewMailEvent", "MovedEvent", "CopiedEvent", "DeletedEvent"],
        f"kinds {kinds}",
    )
    c, mod, fmod, new, mv, cp, d = evs
    check(c.item_id.id == ews_id(m1) and c.parent_folder_id.id == inbox.id, f"created {c}")
    check(mod.item_id.id == ews_id(m1), f"modified {mod}")
    check(fmod.folder_id.id == inbox.id and fmod.unread_count == 7, f"folder modified {fmod}")
    check(new.item_id.id == ews_id(f"{inbox_key}/m9"), f"new mail {new}")
    check(
        mv.item_id.id == ews_id(f"{drafts_key}/m1") and mv.old_item_id.id == ews_id(m1)
        and mv.old_parent_folder_id.id == inbox.id and mv.parent_folder_id.id == ews_id(drafts_key),
        f"moved {mv}",
    )
    check(cp.old_item_id.id == ews_id(f"{drafts_key}/d1") and cp.parent_folder_id.id == inbox.id, f"copied {cp}")
    check(d.item_id.id == ews_id(f"{inbox_key}/m2"), f"deleted {d}")
    wms = [e.watermark for e in evs]
    check(len(set(wms)) == len(wms), "watermarks are distinct")
    wm = wms[-1]

    # A dequeue: polling again gives nothing new.
    n = drain(inbox, sid, wm)
    check([type(e) for e in events_of(n)] == [StatusEvent], "events are dequeued once")

    # 120 events: at most 50 per notification, MoreEvents on all but the last, none repeated.
    before = wm
    publish(*[created(f"{inbox_key}/bulk-{i}", inbox_key) for i in range(120)])
    n = drain(inbox, sid, wm)
    check(len(n) >= 3, f"{len(n)} notifications for 120 events")
    check(all(len(x.events) <= 50 for x in n), "at most 50 events per notification")
    check([x.more_events for x in n] == [True] * (len(n) - 1) + [False], "MoreEvents")
    ids = [e.item_id.id for e in events_of(n)]
    check(ids == [ews_id(f"{inbox_key}/bulk-{i}") for i in range(120)], "120 created events in order, once each")

    # Resubscribe from a watermark: the same 120 events again under a new subscription.
    sid2, wm2 = inbox.subscribe_to_pull(watermark=before, timeout=5)
    check(wm2 == before, "resubscribing answers the watermark given")
    again = [e.item_id.id for e in events_of(drain(inbox, sid2, wm2))]
    check(again == ids, "resubscribing from a watermark replays what followed it")

    # Subscribe to all folders: sees other folders of the mailbox, never Bob's.
    asid, awm = acct.subscribe_to_pull(timeout=5)
    publish(created(f"{drafts_key}/x", drafts_key), created(f"{BOB}/inbox/y", f"{BOB}/inbox"))
    evs = events_of(list(Root(account=acct).get_events(asid, awm)))
    check([e.item_id.id for e in evs] == [ews_id(f"{drafts_key}/x")], f"all folders: {evs}")

    # Errors.
    raises(ErrorInvalidWatermark, lambda: inbox.subscribe_to_pull(watermark="AQAAAA==", timeout=5), "foreign watermark")
    raises(ErrorInvalidWatermark, lambda: inbox.subscribe_to_pull(watermark="HW" + "_" * 11, timeout=5), "future watermark")
    inbox.unsubscribe(sid)
    raises(ErrorSubscriptionNotFound, lambda: inbox.unsubscribe(sid), "second unsubscribe")
    raises(ErrorSubscriptionNotFound, lambda: drain(inbox, sid, wm), "get_events after unsubscribe")
    raises(ErrorSubscriptionNotFound, lambda: drain(inbox, "HSbogus", wm), "unknown id")

    # Another user may not read or end Alice's subscription.
    bob = account(BOB)
    raises(ErrorSubscriptionAccessDenied, lambda: list(Root(account=bob).get_events(sid2, wm2)), "Bob polls Alice's")
    raises(ErrorSubscriptionAccessDenied, lambda: Root(account=bob).unsubscribe(sid2), "Bob ends Alice's")
    from exchangelib.folders import Inbox

    alices = Inbox(root=bob.root, id=inbox.id, changekey=inbox.changekey)
    raises(ErrorAccessDenied, lambda: alices.subscribe_to_pull(timeout=5), "Bob subscribes to Alice's inbox")
    inbox.unsubscribe(sid2)
    acct.unsubscribe(asid)

    # Timeout: a pull subscription not polled for `timeout` minutes is gone.
    sid3, wm3 = inbox.subscribe_to_pull(timeout=1)
    time.sleep(MINUTE * 2.5)
    raises(ErrorExpiredSubscription, lambda: drain(inbox, sid3, wm3), "expired pull subscription")


def streaming():
    acct = account()
    inbox = acct.inbox
    s1 = inbox.subscribe_to_streaming()
    s2 = acct.subscribe_to_streaming()  # all folders
    key = f"{ALICE}/inbox/s-1"
    threading.Timer(MINUTE * 0.3, lambda: publish(created(key, f"{ALICE}/inbox"))).start()
    got = list(inbox.get_streaming_events([s1, s2], connection_timeout=1, max_notifications_returned=2))
    check(sorted(n.subscription_id for n in got) == sorted([s1, s2]), f"one notification per subscription: {got}")
    for n in got:
        check([e.item_id.id for e in n.events] == [ews_id(key)], f"streamed {n.events}")

    # Events made while no connection is open wait for the next one, in order.
    keys = [f"{ALICE}/inbox/s-{i}" for i in range(2, 6)]
    publish(*[created(k, f"{ALICE}/inbox") for k in keys])
    got = list(inbox.get_streaming_events([s1], connection_timeout=1, max_notifications_returned=1))
    check([e.item_id.id for e in events_of(got)] == [ews_id(k) for k in keys], f"queued while away: {got}")

    # An idle connection ends with Closed after ConnectionTimeout; heartbeats yield nothing.
    t0 = time.monotonic()
    got = list(inbox.get_streaming_events([s1], connection_timeout=1))
    took = time.monotonic() - t0
    check(got == [], f"idle stream: {got}")
    check(MINUTE * 0.8 <= took <= MINUTE * 3 + 5, f"idle stream closed after {took:.1f}s")
    print(f"  idle stream closed after {took:.2f} s (ConnectionTimeout 1 = {MINUTE} s)", flush=True)

    # Heartbeats on the wire, and the `<s:Envelope xmlns` spelling exchangelib's splitter needs.
    body = (
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
        'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><s:Header>'
        '<t:RequestServerVersion Version="Exchange2016"/></s:Header><s:Body><m:GetStreamingEvents>'
        f"<m:SubscriptionIds><t:SubscriptionId>{s1}</t:SubscriptionId></m:SubscriptionIds>"
        "<m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents></s:Body></s:Envelope>"
    )
    r = requests.post(ENDPOINT, data=body, auth=(ALICE, PASSWORDS[ALICE]),
                      headers={"Content-Type": "text/xml; charset=utf-8"}, timeout=MINUTE * 3 + 10)
    text = r.text
    check(text.count("<s:Envelope xmlns") >= 3, f"envelopes: {text[:300]}")
    check(text.count("<m:ConnectionStatus>OK</m:ConnectionStatus>") >= 2, "at least one heartbeat besides the first")
    check(text.rstrip().endswith("</s:Envelope>") and "<m:ConnectionStatus>Closed</m:ConnectionStatus>" in text, "Closed")

    # Unknown ids and other users' subscriptions.
    e = raises(ErrorInvalidSubscription, lambda: list(inbox.get_streaming_events(["bogus"], connection_timeout=1)), "bad id")
    check("bogus" in str(e), f"the error names the id: {e}")
    bob = account(BOB)
    raises(ErrorSubscriptionAccessDenied,
           lambda: list(Root(account=bob).get_streaming_events([s1], connection_timeout=1)), "Bob streams Alice's")
    raises(ErrorInvalidPullSubscriptionId, lambda: drain(inbox, s1, "HWAAAAAAAAAAAA"), "GetEvents on a streaming id")
    inbox.unsubscribe(s1)
    acct.unsubscribe(s2)
    raises(ErrorInvalidSubscription, lambda: list(inbox.get_streaming_events([s1], connection_timeout=1)), "after unsubscribe")


class Receiver:
    """An HTTP server that parses each SendNotification with exchangelib and answers as told."""

    def __init__(self):
        self.got = queue.Queue()
        self.answer = "ok"  # or "unsubscribe", "fail"
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.requests += 1
                ws = SendNotification(protocol=None)
                if owner.answer == "fail":
                    self.send_response(503)
                    self.end_headers()
                    owner.got.put(("failed", time.monotonic()))
                    return
                for n in ws.parse(body):
                    owner.got.put(n)
                reply = ws.unsubscribe_payload() if owner.answer == "unsubscribe" else ws.ok_payload()
                self.send_response(200)
                self.send_header("Content-Type", "text/xml; charset=utf-8")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cb"

    def next(self, timeout=15):
        return self.got.get(timeout=timeout)

    def stop(self):
        self.server.shutdown()


def push():
    acct = account()
    inbox = acct.inbox
    rx = Receiver()
    psid, pwm = inbox.subscribe_to_push(rx.url, status_frequency=1)
    first = rx.next()
    check(first.subscription_id == psid and first.previous_watermark == pwm, f"first push {first}")
    check([type(e) for e in first.events] == [StatusEvent], f"first push is a StatusEvent: {first.events}")

    key = f"{ALICE}/inbox/p-1"
    publish(created(key, f"{ALICE}/inbox"), created(f"{ALICE}/drafts/no", f"{ALICE}/drafts"))
    n = rx.next()
    check([e.item_id.id for e in n.events] == [ews_id(key)], f"pushed {n.events}")
    check(n.previous_watermark == first.events[-1].watermark, "PreviousWatermark chains")
    last = n.events[-1].watermark

    # Order and batching: 120 events arrive once each, in order, at most 50 per request.
    publish(*[created(f"{ALICE}/inbox/pb-{i}", f"{ALICE}/inbox") for i in range(120)])
    seen = []
    while len(seen) < 120:
        n = rx.next()
        check(len(n.events) <= 50, "at most 50 events per push")
        seen += [e.item_id.id for e in n.events if not isinstance(e, StatusEvent)]
        if n.events and not isinstance(n.events[-1], StatusEvent):
            last = n.events[-1].watermark
    check(seen == [ews_id(f"{ALICE}/inbox/pb-{i}") for i in range(120)], "pushed in order, once each")

    # Keep-alive: a StatusEvent after StatusFrequency without events.
    n = rx.next(timeout=MINUTE * 3 + 5)
    check([type(e) for e in n.events] == [StatusEvent], f"keep-alive {n.events}")

    # A push subscription is not ended by Unsubscribe (only by the client's reply).
    raises(ErrorInvalidPullSubscriptionId, lambda: inbox.unsubscribe(psid), "Unsubscribe on a push id")

    # The client answers Unsubscribe: no more pushes.
    rx.answer = "unsubscribe"
    publish(created(f"{ALICE}/inbox/p-2", f"{ALICE}/inbox"))
    rx.next()
    count = rx.requests
    publish(created(f"{ALICE}/inbox/p-3", f"{ALICE}/inbox"))
    time.sleep(MINUTE * 1.5)
    check(rx.requests == count, "no push after the client answered Unsubscribe")
    raises(ErrorSubscriptionNotFound, lambda: drain(inbox, psid, pwm), "the subscription is gone")

    # Resubscribing from the last watermark seen delivers what was missed, under a new id.
    rx.answer = "ok"
    psid2, _ = inbox.subscribe_to_push(rx.url, status_frequency=1, watermark=last)
    seen = []
    while len(seen) < 2:
        n = rx.next()
        check(n.subscription_id == psid2, "new id")
        seen += [e.item_id.id for e in n.events if not isinstance(e, StatusEvent)]
    check(seen == [ews_id(f"{ALICE}/inbox/p-2"), ews_id(f"{ALICE}/inbox/p-3")], f"missed events: {seen}")

    # A receiver that keeps failing: retries that double, then the subscription is dropped.
    rx.answer = "fail"
    publish(created(f"{ALICE}/inbox/p-4", f"{ALICE}/inbox"))
    times = []
    deadline = time.monotonic() + MINUTE * 6 + 10
    while time.monotonic() < deadline:
        try:
            item = rx.got.get(timeout=MINUTE * 3)
        except queue.Empty:
            break
        if isinstance(item, tuple):
            times.append(item[1])
    check(len(times) >= 2, f"retried: {len(times)} attempts")
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Doubling: retry n waits between half and all of base * 2^(n-1), so over k gaps the last
    # is at least 2^(k-1) / 2 times the first (1.8x for three, with a margin for a busy
    # machine) and none is shorter than the one before (by much).
    least = 2 ** (len(gaps) - 1) / 2 * 0.9
    check(len(gaps) >= 2 and gaps[-1] > gaps[0] * least and all(g2 > g1 * 0.8 for g1, g2 in zip(gaps, gaps[1:])),
          f"retry gaps double: {gaps}")
    print(f"  push retries: {len(times)} attempts, gaps {[round(g, 2) for g in gaps]} s", flush=True)
    rx.answer = "ok"
    publish(created(f"{ALICE}/inbox/p-5", f"{ALICE}/inbox"))
    time.sleep(MINUTE * 1.5)
    check(rx.got.empty(), "no push after the subscription was dropped")
    rx.stop()

    # Bad URLs.
    raises(ErrorInvalidPushSubscriptionUrl, lambda: inbox.subscribe_to_push("ftp://x/", status_frequency=1), "ftp URL")
    raises(ErrorInvalidPushSubscriptionUrl, lambda: inbox.subscribe_to_push("not a url", status_frequency=1), "no URL")


def noauth():
    """With authentication off, the mailbox is the one exchangelib names in X-AnchorMailbox."""
    acct = account(noauth=True)
    inbox = acct.inbox
    check(inbox.id == ews_id(f"{ALICE}/inbox"), f"inbox id {inbox.id}")
    sid, wm = inbox.subscribe_to_pull(timeout=5)
    publish(created(f"{ALICE}/inbox/n-1", f"{ALICE}/inbox"))
    evs = events_of(drain(inbox, sid, wm))
    check([e.item_id.id for e in evs] == [ews_id(f"{ALICE}/inbox/n-1")], f"noauth pull: {evs}")
    inbox.unsubscribe(sid)


def resume():
    """A pull subscription on this node; the client then moves to the node events are published
    on (HERALD_PUBLISH_BASE), subscribes there with the last watermark it holds, and gets
    exactly what it had not seen."""
    check(PUBLISH_BASE != BASE, "resume needs HERALD_PUBLISH_BASE, another node")
    acct = account()
    inbox = acct.inbox
    sid, wm = inbox.subscribe_to_pull(timeout=5)
    first = [f"{ALICE}/inbox/r-{i}" for i in range(3)]
    publish(*[created(k, f"{ALICE}/inbox") for k in first])
    seen = []
    deadline = time.monotonic() + 15
    while len(seen) < 3 and time.monotonic() < deadline:
        n = drain(inbox, sid, wm)
        wm = n[-1].events[-1].watermark
        seen += [e.item_id.id for e in events_of(n) if not isinstance(e, StatusEvent)]
        time.sleep(0.1)
    check(seen == [ews_id(k) for k in first], f"pulled on this node: {seen}")
    later = [f"{ALICE}/inbox/r-{i}" for i in range(3, 6)]
    publish(*[created(k, f"{ALICE}/inbox") for k in later])
    # The other node, from the watermark the client holds.
    global ENDPOINT
    ENDPOINT = PUBLISH_BASE + "/EWS/Exchange.asmx"
    other = account().inbox
    sid2, wm2 = other.subscribe_to_pull(timeout=5, watermark=wm)
    check(wm2 == wm, f"resumed at the watermark given: {wm2} for {wm}")
    got = events_of(drain(other, sid2, wm2))
    check([e.item_id.id for e in got if not isinstance(e, StatusEvent)] == [ews_id(k) for k in later],
          f"resumed on the other node with nothing missed or repeated: {got}")
    other.unsubscribe(sid2)
    ENDPOINT = BASE + "/EWS/Exchange.asmx"


def takeover():
    """A push subscription made on this node, whose process (HERALD_KILL_PID) is SIGKILLed while
    events are published on another node (HERALD_PUBLISH_BASE): the other node takes the
    subscription over and pushes every event, in order; a repeat is a whole notification pushed
    again from the last watermark the dead node recorded, never a gap."""
    check(PUBLISH_BASE != BASE, "takeover needs HERALD_PUBLISH_BASE, another node")
    pid = int(os.environ["HERALD_KILL_PID"])
    acct = account()
    inbox = acct.inbox
    rx = Receiver()
    psid, pwm = inbox.subscribe_to_push(rx.url, status_frequency=1)
    first = rx.next()
    check(first.subscription_id == psid and first.previous_watermark == pwm, f"first push {first}")
    keys = [f"{ALICE}/inbox/t-{i}" for i in range(60)]
    notifications = []

    def item_ids():
        return [e.item_id.id for n in notifications for e in n.events if not isinstance(e, StatusEvent)]

    for i in range(30):
        publish(created(keys[i], f"{ALICE}/inbox"))
    while len(item_ids()) < 10:
        notifications.append(rx.next())
    os.kill(pid, 9)
    for i in range(30, 60):
        publish(created(keys[i], f"{ALICE}/inbox"))
    deadline = time.monotonic() + 60
    while set(item_ids()) != {ews_id(k) for k in keys} and time.monotonic() < deadline:
        try:
            notifications.append(rx.next(timeout=5))
        except queue.Empty:
            pass
    seen = item_ids()
    once = list(dict.fromkeys(seen))
    check(once == [ews_id(k) for k in keys], f"every event, in order, after the takeover: {once}")
    check(all(n.subscription_id == psid for n in notifications), "one subscription id throughout")
    # Notifications chain by watermark; at the takeover the chain may step back once, to the
    # last watermark the dead node recorded, and the events after it come again.
    previous = [n.previous_watermark for n in notifications]
    lasts = [n.events[-1].watermark for n in notifications]
    rewinds = sum(1 for i in range(1, len(notifications)) if previous[i] != lasts[i - 1])
    check(rewinds <= 1, f"the watermark chain stepped back {rewinds} times: {list(zip(previous, lasts))}")
    print(f"  takeover: {len(seen)} events pushed for {len(keys)} ({len(seen) - len(keys)} again)", flush=True)
    # The client ends it on the node that took it over: nothing more is pushed.
    rx.answer = "unsubscribe"
    rx.next(timeout=MINUTE * 3 + 15)
    count = rx.requests
    time.sleep(MINUTE * 2)
    check(rx.requests == count, "no push after the client answered Unsubscribe")
    rx.stop()


SECTIONS = {"takeover": takeover, "resume": resume, "folders": folders, "pull": pull, "streaming": streaming, "push": push, "noauth": noauth}

if __name__ == "__main__":
    wanted = sys.argv[4:] or ["folders", "pull", "streaming", "push"]
    for name in wanted:
        t0 = time.monotonic()
        SECTIONS[name]()
        print(f"ews {name}: ok ({time.monotonic() - t0:.1f}s)", flush=True)
    exchangelib.close_connections()
