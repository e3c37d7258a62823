"""Delayed tasks coming due together: how fast a broker forwards them to consumers.

    python bench/delayed.py                                   # SQLite in a temporary directory
    python bench/delayed.py --broker memory://
    python bench/delayed.py --broker redis://127.0.0.1:6379/0 --count 10000 --delay 3

Publishes `--count` messages with the same `--delay` (in batches of `--publish-batch`), then
fetches them with `--fetch-batch` per call (acking each batch) until all have come back.
The delay should exceed the publish time, so that every message comes due at about the same
moment. Reports the publish rate and, from the moment the first message came due until the
last was fetched, the forwarding rate in tasks/s; also how long after the last came due the
final one arrived, how many fetch calls returned work, and any message fetched early or twice
(both must be 0). Exits 1 when a message is early, duplicated or missing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conveyor_server.brokers.base import Broker, OutgoingMessage
from conveyor_server.engines import open_broker

LEASE_SECONDS = 300.0


async def measure(broker: Broker, args: argparse.Namespace) -> bool:
    queue = f"bench-delayed-{uuid.uuid4().hex[:10]}"
    ids = [f"d{i:07d}" for i in range(args.count)]
    body = b"x" * args.body_bytes
    publish_started = time.time()
    for offset in range(0, args.count, args.publish_batch):
        await broker.publish(queue, [
            OutgoingMessage(message_id=i, body=body, delay=args.delay) for i in ids[offset:offset + args.publish_batch]
        ])
    publish_ended = time.time()
    first_due = publish_started + args.delay
    last_due = publish_ended + args.delay
    if publish_ended > first_due:
        print(f"warning: publishing took {publish_ended - publish_started:.2f} s, longer than the delay; "
              "use a longer --delay for a clean figure", file=sys.stderr)

    seen: set[str] = set()
    duplicates = early = fetches = 0
    deadline = last_due + args.timeout
    while len(seen) < args.count and time.time() < deadline:
        batch = await broker.fetch(queue, args.fetch_batch, LEASE_SECONDS, wait_seconds=0.5)
        if not batch:
            continue
        fetched_at = time.time()
        fetches += 1
        early += sum(fetched_at < first_due - 0.01 for _ in batch)
        for delivery in batch:
            if delivery.message_id in seen:
                duplicates += 1
            seen.add(delivery.message_id)
        await broker.ack(batch)
    done = time.time()
    await broker.purge(queue)

    engine = urlsplit(args.broker).scheme
    publish_s = publish_ended - publish_started
    forward_s = max(done - first_due, 1e-9)
    print(f"{engine}: published {args.count:,} tasks delayed {args.delay:g} s in {publish_s:.2f} s "
          f"({args.count / max(publish_s, 1e-9):,.0f}/s)")
    print(f"{engine}: {len(seen):,} fetched {forward_s:.2f} s after the first came due, "
          f"{max(done - last_due, 0.0):.2f} s after the last: {len(seen) / forward_s:,.0f} tasks/s; "
          f"{fetches} fetches with work, {early} early, {duplicates} duplicates, "
          f"{args.count - len(seen)} missing")
    return early == 0 and duplicates == 0 and len(seen) == args.count


async def run(args: argparse.Namespace) -> bool:
    broker = open_broker(args.broker)
    await broker.connect()
    try:
        return await measure(broker, args)
    finally:
        await broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", help="broker URL (default: SQLite in a temporary directory)")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds every message is delayed")
    parser.add_argument("--publish-batch", type=int, default=1_000, help="messages per publish call")
    parser.add_argument("--fetch-batch", type=int, default=1_000, help="most messages per fetch call")
    parser.add_argument("--body-bytes", type=int, default=200, help="size of each message body")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up this long after the last came due")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        if not args.broker:
            args.broker = f"sqlite:///{Path(tmp) / 'delayed.db'}"
        ok = asyncio.run(run(args))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
