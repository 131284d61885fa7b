"""Sign a payload with a provider's own published library.

Usage: sign.py SCHEME SECRET MESSAGE_ID < body
Prints the request headers as a JSON object. Schemes: standardwebhooks, svix, stripe.
"""
import datetime
import json
import sys


def main() -> None:
    scheme, secret, message_id = sys.argv[1:4]
    body = sys.stdin.buffer.read().decode("utf-8")
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    if scheme == "standardwebhooks":
        from standardwebhooks.webhooks import Webhook

        signature = Webhook(secret).sign(message_id, now, body)
        headers = {"webhook-id": message_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}
    elif scheme == "svix":
        from svix.webhooks import Webhook

        signature = Webhook(secret).sign(message_id, now, body)
        headers = {"svix-id": message_id, "svix-timestamp": str(int(now.timestamp())), "svix-signature": signature}
    elif scheme == "stripe":
        import stripe

        headers = {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(body, secret)}
    else:
        raise SystemExit(f"unknown scheme {scheme}")
    print(json.dumps(headers))


if __name__ == "__main__":
    main()
