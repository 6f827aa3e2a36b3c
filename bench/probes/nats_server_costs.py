"""What the operations of a NATS retry cost the server, one at a time.

Drives a nats-server with a plain client (nats-py) and reads the server's
CPU time from /proc around each kind of operation, so the figures are the
server's alone, whatever the (slow) Python client spends. Throwaway streams
named PROBE_*; nothing else on the server is touched.

    .brokers/venv/bin/pip install nats-py
    .brokers/venv/bin/python bench/probes/nats_server_costs.py 4222 20000 \
        $(pgrep -f 'nats-server -a 127.0.0.1 -p 4222')

Prints server microseconds per operation: a failure record's publish (a
stream with one message per subject, each record its own subject, as
ticketrail writes them), a plain publish for comparison, the record's
purge by subject and its delete by sequence (both JetStream API requests
sent without a reply subject, as ticketrail sends its purge), and a pull
consumer's delivery, ack and delayed nak. CPU time is read in clock
ticks (10 ms): use 20,000 operations or more. BENCHMARKS.md.

With a fourth argument `pulls`, prints instead what a delivery costs when
pulled in batches of 10, 50, 100 and 400, or of the sizes given after it
(requests shaped as ticketrail sends them, two open at a time): use
100,000 operations, and alternate sizes (`pulls 50 100 50 100 ...`) to
compare two.
"""

import asyncio
import json
import os
import sys

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

PORT, N, PID = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
TICK = os.sysconf("SC_CLK_TCK")
WINDOW = 500  # publishes awaited together


def server_cpu():
    fields = open(f"/proc/{PID}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def report(what, before):
    print(f"{what:<52} {1e6 * (server_cpu() - before) / N:6.1f} us")


async def recreate(js, config):
    try:
        await js.delete_stream(config.name)
    except Exception:
        pass
    await js.add_stream(config)
    # A stream deleted just before may still be cleaned up on the server.
    await asyncio.sleep(2)


async def publish_all(js, subject_of, headers=None):
    sequences = []
    for start in range(0, N, WINDOW):
        acks = await asyncio.gather(
            *[
                js.publish(subject_of(i), b"1733400000000 1", headers=headers)
                for i in range(start, min(N, start + WINDOW))
            ]
        )
        sequences += [ack.seq for ack in acks]
    return sequences


async def until_empty(js, name):
    while (await js.stream_info(name)).state.messages:
        await asyncio.sleep(0.05)


async def records(nc, js):
    name = "PROBE_FAIL"
    subject = lambda i: f"probe_fail.s.c.{i}"
    config = StreamConfig(
        name=name,
        subjects=["probe_fail.>"],
        storage=StorageType.FILE,
        max_msgs_per_subject=1,
        max_age=3600.0,
        discard=DiscardPolicy.OLD,
        allow_direct=True,
    )
    await recreate(js, config)
    before = server_cpu()
    await publish_all(js, subject, {"Nats-Expected-Last-Subject-Sequence": "0"})
    report("failure record publish (own subject, expected seq)", before)
    before = server_cpu()
    for i in range(N):
        body = json.dumps({"filter": subject(i)}).encode()
        await nc.publish(f"$JS.API.STREAM.PURGE.{name}", body)
    await nc.flush()
    await until_empty(js, name)
    report("its purge by subject, no reply", before)
    sequences = await publish_all(js, subject)
    before = server_cpu()
    for sequence in sequences:
        body = json.dumps({"seq": sequence, "no_erase": True}).encode()
        await nc.publish(f"$JS.API.STREAM.MSG.DELETE.{name}", body)
    await nc.flush()
    await until_empty(js, name)
    report("its delete by sequence, no reply", before)
    await js.delete_stream(name)

    await recreate(js, StreamConfig(name="PROBE_PLAIN", subjects=["probe_plain.>"]))
    before = server_cpu()
    await publish_all(js, lambda i: "probe_plain.x")
    report("plain publish, one subject", before)
    await js.delete_stream("PROBE_PLAIN")


async def filled_work_stream(js, name, durable):
    """A new interest stream `name` holding N messages, with an explicitly
    acked durable pull consumer `durable` that may hold them all."""
    await recreate(
        js,
        StreamConfig(
            name=name,
            subjects=[f"{name.lower()}.>"],
            retention=RetentionPolicy.INTEREST,
        ),
    )
    await js.add_consumer(
        name,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=N + 1,
            ack_wait=300,
        ),
    )
    await publish_all(js, lambda i: f"{name.lower()}.x")


async def settlements(nc, js):
    for settle, payload in (("ack", b"+ACK"), ("nak, delay 60 s", b'-NAK {"delay": 60000000000}')):
        await filled_work_stream(js, "PROBE_WORK", "work")
        pull = await js.pull_subscribe_bind("work", "PROBE_WORK")
        delivered = []
        before = server_cpu()
        while len(delivered) < N:
            delivered += await pull.fetch(min(WINDOW, N - len(delivered)), timeout=5)
        report(f"delivery (pulled in batches of {WINDOW})", before)
        before = server_cpu()
        for message in delivered:
            await nc.publish(message.reply, payload)
        await nc.flush()
        await asyncio.sleep(0.5)
        report(settle, before)
        await pull.unsubscribe()
        await js.delete_stream("PROBE_WORK")


async def pulls(nc, js):
    """Deliveries pulled in batches of several sizes: the slope between
    them is what one pull request costs the server (BENCHMARKS.md)."""
    for batch in [int(b) for b in sys.argv[5:]] or (10, 50, 100, 400):
        await filled_work_stream(js, "PROBE_PULL", "pull")
        # Requests as ticketrail sends them: a batch and an expiry, to an
        # inbox of the subscription's own, two open at a time (the next
        # sent as one is answered in full), so the server always holds one.
        inbox = nc.new_inbox()
        received = asyncio.Queue()
        sub = await nc.subscribe(inbox, cb=received.put)

        async def request(want):
            body = json.dumps({"batch": want, "expires": 5_000_000_000}).encode()
            await nc.publish("$JS.API.CONSUMER.MSG.NEXT.PROBE_PULL.pull", body, reply=inbox)

        asked = 0
        before = server_cpu()
        for _ in range(2):
            want = min(batch, N - asked)
            if want:
                await request(want)
                asked += want
        for delivered in range(1, N + 1):
            await asyncio.wait_for(received.get(), 5)
            if delivered % batch == 0 and asked < N:
                want = min(batch, N - asked)
                await request(want)
                asked += want
        report(f"delivery, pulled in batches of {batch}", before)
        await sub.unsubscribe()
        await js.delete_stream("PROBE_PULL")


async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{PORT}")
    js = nc.jetstream()
    if "pulls" in sys.argv[4:]:
        await pulls(nc, js)
        await nc.close()
        return
    await records(nc, js)
    await settlements(nc, js)
    await nc.close()


asyncio.run(main())
