"""Writes COUNT signed Begini events, one per line: the X-Signature value, a tab,
the body. For bench/ingest.lua, which sends them with wrk: the events are made
and signed before the clock starts, so that the load generator takes less of
the two cores it shares with what it measures.

    python3 bench/signed_events.py COUNT API_KEY > events.tsv
"""
import hashlib
import hmac
import json
import random
import sys
import time
import uuid


def uid_v7():
    # Time-ordered like the load generator's uuids: keys sent together are
    # neighbours in the key index, as they are in service.
    ms = time.time_ns() // 1_000_000
    rand = random.getrandbits(74)
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value)).upper()


def event():
    now = int(time.time())
    return {
        "uid": uid_v7(),
        "integration_id": "40417538227164719835",
        "event": {
            "type": "psychometric_score.complete",
            "details": {
                "scored_at": now,
                "score": random.randrange(300, 850),
                "model": "psychometric-v7.3",
                "segments": {"conscientiousness": 0.71, "impulsivity": 0.22, "financial_literacy": 0.64, "trust": 0.58},
                "device": {"platform": "android", "os_version": "14", "app_version": "5.12.0", "locale": "es_MX"},
                "session": {"started_at": now - 900, "duration_seconds": 842, "questions": 48},
                "response_times_ms": [random.randrange(800, 9000) for _ in range(48)],
                "features": {"consistency_index": 0.83, "straightlining": 0.04, "completion_ratio": 1.0,
                             "revision_rate": 0.12, "median_latency_ms": 3120, "night_session": False},
            },
            "reasons": ["completed_assessment", "sufficient_data", "consistent_responses", "device_verified"],
        },
    }


def main():
    count, key = int(sys.argv[1]), sys.argv[2].encode()
    out = sys.stdout
    for _ in range(count):
        body = json.dumps(event(), separators=(",", ":")).encode()
        signature = hmac.new(key, body, hashlib.sha512).hexdigest()
        out.write(signature + "\t" + body.decode() + "\n")


if __name__ == "__main__":
    main()
