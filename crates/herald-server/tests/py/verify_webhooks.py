"""Verifies recorded webhook requests with the Standard Webhooks reference package.

Usage: verify_webhooks.py RECORDED.json SECRET [SECRET...]
RECORDED.json is a list of {"headers": {...}, "body": "..."}; every request must verify
with every secret given (each secret separately). Prints "verified N" or fails.
"""
import json
import sys

from standardwebhooks.webhooks import Webhook

recorded = json.load(open(sys.argv[1]))
secrets = sys.argv[2:]
assert recorded, "no requests recorded"
for secret in secrets:
    hook = Webhook(secret)
    for r in recorded:
        hook.verify(r["body"], r["headers"])
# A tampered body must fail.
try:
    Webhook(secrets[0]).verify(recorded[0]["body"] + " ", recorded[0]["headers"])
except Exception:
    pass
else:
    raise SystemExit("a tampered body verified")
print(f"verified {len(recorded)} requests with {len(secrets)} secret(s)")
