"""EWS from the service description alone: zeep 4.3.1 builds its client from a running Herald's
`GET /EWS/Services.wsdl` (and the schemas it imports) and drives GetFolder, pull and streaming
subscriptions with it, as an application generated from the WSDL would.

Usage: ews_zeep.py BASE_URL PRODUCER_KEY
Alice (alice@example.test / alice-pw) is a Herald user; events are published through Herald's
producer API. Exits non-zero on the first failed check, printing which.
"""

import re
import sys
import threading
import time

import requests
import zeep
from lxml import etree
from zeep.transports import Transport

BASE, PRODUCER_KEY = sys.argv[1], sys.argv[2]
ALICE = "alice@example.test"
VERSION = {"RequestVersion": {"Version": "Exchange2016"}}
INBOX = {"_value_1": [{"DistinguishedFolderId": {"Id": "inbox"}}]}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def publish(*events):
    r = requests.post(BASE + "/v1/events", json={"events": list(events)},
                      headers={"Authorization": "Bearer " + PRODUCER_KEY}, timeout=15)
    check(r.ok, f"publish: {r.status_code} {r.text}")
    return r.json()["watermarks"]


def new_mail(name):
    return {"key": f"{ALICE}/inbox/{name}", "kind": "new_mail", "parent": f"{ALICE}/inbox"}


def events_of(notification):
    """(event element name, its fields) for each event of a zeep Notification."""
    out = []
    for choice in notification._value_1 or []:
        for name, value in choice.items():
            if value is not None:
                out.append((name, value))
    return out


session = requests.Session()
session.auth = (ALICE, "alice-pw")
client = zeep.Client(BASE + "/EWS/Services.wsdl", transport=Transport(session=session))
service = client.service
endpoint = BASE + "/EWS/Exchange.asmx"
check(client.wsdl.services["ExchangeServices"].ports["ExchangeServicePort"].binding_options["address"] == endpoint,
      "the description's address is the endpoint the client reached")

# GetFolder: the inbox resolves to a folder id.
r = service.GetFolder(FolderShape={"BaseShape": "IdOnly"}, FolderIds=INBOX, _soapheaders=VERSION)
m = r.body.ResponseMessages.GetFolderResponseMessage[0]
check(m.ResponseClass == "Success", f"GetFolder: {m}")
print("zeep GetFolder: ok", flush=True)

# Pull: subscribe, publish, GetEvents, chain the watermark, unsubscribe.
r = service.Subscribe(PullSubscriptionRequest={
    "FolderIds": INBOX, "EventTypes": {"EventType": ["NewMailEvent", "CreatedEvent"]}, "Timeout": 5},
    _soapheaders=VERSION)
m = r.body.ResponseMessages.SubscribeResponseMessage[0]
check(m.ResponseClass == "Success" and m.SubscriptionId and m.Watermark, f"Subscribe (pull): {m}")
sid, wm = m.SubscriptionId, m.Watermark
publish(new_mail("z-1"), new_mail("z-2"))
seen = []
deadline = time.monotonic() + 15
while len(seen) < 2 and time.monotonic() < deadline:
    r = service.GetEvents(SubscriptionId=sid, Watermark=wm, _soapheaders=VERSION)
    m = r.body.ResponseMessages.GetEventsResponseMessage[0]
    check(m.ResponseClass == "Success", f"GetEvents: {m}")
    n = m.Notification
    check(n.SubscriptionId == sid and n.PreviousWatermark == wm, f"the watermark chains: {n}")
    for name, e in events_of(n):
        wm = e.Watermark
        if name == "NewMailEvent":
            seen.append(e.ItemId.Id)
    time.sleep(0.2)
check(len(seen) == 2 and seen[0] != seen[1], f"two new mails pulled once each: {seen}")
r = service.Unsubscribe(SubscriptionId=sid, _soapheaders=VERSION)
check(r.body.ResponseMessages.UnsubscribeResponseMessage[0].ResponseClass == "Success", "Unsubscribe")
r = service.GetEvents(SubscriptionId=sid, Watermark=wm, _soapheaders=VERSION)
m = r.body.ResponseMessages.GetEventsResponseMessage[0]
check(m.ResponseClass == "Error" and m.ResponseCode == "ErrorSubscriptionNotFound",
      f"GetEvents after Unsubscribe: {m.ResponseClass} {m.ResponseCode}")
print("zeep pull: ok", flush=True)

# Streaming: zeep builds the request and reads each envelope of the one long response (WSDL
# cannot describe a stream of envelopes, so the HTTP exchange is the application's).
r = service.Subscribe(StreamingSubscriptionRequest={
    "FolderIds": INBOX, "EventTypes": {"EventType": ["NewMailEvent"]}}, _soapheaders=VERSION)
m = r.body.ResponseMessages.SubscribeResponseMessage[0]
check(m.ResponseClass == "Success", f"Subscribe (streaming): {m}")
stream_id = m.SubscriptionId
threading.Timer(0.7, lambda: publish(new_mail("z-3"))).start()
envelope = client.create_message(service, "GetStreamingEvents",
                                 SubscriptionIds={"SubscriptionId": [stream_id]}, ConnectionTimeout=1,
                                 _soapheaders=VERSION)
operation = client.service._binding.get("GetStreamingEvents")
resp = session.post(endpoint, data=etree.tostring(envelope), stream=True, timeout=120,
                    headers={"Content-Type": "text/xml; charset=utf-8"})
check(resp.status_code == 200, f"GetStreamingEvents: HTTP {resp.status_code}")
buf, statuses, streamed = b"", [], []
for chunk in resp.iter_content(chunk_size=None):
    buf += chunk
    while (found := re.search(rb"<(\w+:)?Envelope[ >].*?</(\w+:)?Envelope>", buf, re.S)):
        buf = buf[found.end():]
        reply = operation.process_reply(etree.fromstring(found.group(0)))
        msg = reply.body.ResponseMessages.GetStreamingEventsResponseMessage[0]
        check(msg.ResponseClass == "Success", f"a streamed message: {msg}")
        statuses.append(msg.ConnectionStatus)
        for n in (msg.Notifications.Notification if msg.Notifications else []):
            check(n.SubscriptionId == stream_id, "the streamed notification names the subscription")
            streamed += [e.ItemId.Id for name, e in events_of(n) if name == "NewMailEvent"]
    if "Closed" in statuses:
        break
check(len(streamed) == 1, f"the new mail was streamed once: {streamed}")
check(statuses[-1] == "Closed" and "OK" in statuses, f"heartbeats, then Closed: {statuses}")
service.Unsubscribe(SubscriptionId=stream_id, _soapheaders=VERSION)
print("zeep streaming: ok", flush=True)
