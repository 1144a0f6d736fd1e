"""Where a subscription's bytes go: a tracemalloc profile of the broker's own data structures.

    python3 bench/subs_memory.py [--count 50000]

It runs the broker's code in this process (a real Broker over a real sqlite store in a temp dir,
fed real SUBSCRIBE frames through data_received, with no sockets) and compares tracemalloc
snapshots taken before and after, grouped by the source line that allocated what is still held.
RSS figures come from bench/run.py and bench/scale.py; this script says what they are made of.
"""

import argparse
import gc
import os
import sys
import tempfile
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ocamlmq          # noqa: E402
import storage_sqlite   # noqa: E402

DESTINATIONS = {
    "queue (one queue each)": lambda i: f"/queue/q-{i}",
    "queue (all on one queue)": lambda i: "/queue/shared",
    "topic (half prefix)": lambda i: f"/topic/t-{i}" + ("*" if i % 2 else ""),
}


class NoTimer:
    def cancel(self):
        pass


def profile(destination, count, directory):
    backend = storage_sqlite.SqliteBackend(os.path.join(directory, f"{id(destination)}.db"))
    broker = ocamlmq.Broker(ocamlmq.MessageStore(backend, storage_sqlite.StorageError),
                            lambda *args: NoTimer())
    client = broker.connection_made("bench")
    broker.data_received(client, b"CONNECT\naccept-version:1.2\nhost:x\n\n\0")
    frames = [f"SUBSCRIBE\nid:s-{i}\ndestination:{destination(i)}\nack:client\n\n\0".encode()
              for i in range(count)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for start in range(0, count, 1000):
        broker.data_received(client, b"".join(frames[start:start + 1000]))
        client.drop_output(0)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    backend.close()
    return sum(s.size_diff for s in stats), [s for s in stats if s.size_diff > count]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        for name, destination in DESTINATIONS.items():
            total, lines = profile(destination, args.count, directory)
            print(f"{name}: {total / args.count:.0f} bytes per subscription (traced)")
            for stat in lines:
                frame = stat.traceback[0]
                source = open(frame.filename).read().splitlines()[frame.lineno - 1].strip()
                print(f"  {stat.size_diff / args.count:6.0f}  {os.path.basename(frame.filename)}:"
                      f"{frame.lineno}  {source[:70]}")


if __name__ == "__main__":
    main()
