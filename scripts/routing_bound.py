#!/usr/bin/env python3
"""What any router could reach in the routing benchmark's scenarios.

A discrete-event model of server/examples/routing_quality.rs: backends with 4 slots and
a FIFO queue, a fixed service time, and the benchmark's arrivals: each gateway replica
gets an even share of 70% or 90% of the pool's capacity at fixed intervals (open loop),
the replicas out of phase. `--poisson` draws arrivals at random instead, which queues
more. It routes the same arrivals with

- least_request: power of two choices over the replica's own in-flight counts (what
  Envoy and gRPC do), and
- bound: a router that knows every backend's exact free slots, queue and service time,
  and sends each call where it will finish first (greedy earliest completion, scanning
  every backend, no staleness, no network).

and prints p99 latency for both and their ratio. The bound's p99 over least_request's
p99 is how far below least_request any real policy can get; the gateway's gpu_aware
ratio from routing_quality is compared against it in BENCHMARKS.md. The model has no
gateway overhead or timer slack (about 2 ms in the real runs), so its absolute numbers
are a little lower than measured ones.

    python3 scripts/routing_bound.py            # 60 simulated seconds per run
    python3 scripts/routing_bound.py 20         # shorter
    python3 scripts/routing_bound.py 60 --poisson
"""

import heapq
import random
import sys

SLOTS = 4
BASE = 0.020


def backend(service=BASE, hidden_slots=0):
    return {"service": service, "slots": SLOTS - hidden_slots}


SCENARIOS = [
    (1, "heterogeneous (one backend 3x slower)",
     [backend(), backend(), backend(), backend(service=3 * BASE)], 1),
    (2, "hidden load (one backend half taken by invisible work)",
     [backend(), backend(), backend(), backend(hidden_slots=2)], 1),
    (3, "three gateway replicas, one backend with hidden load",
     [backend(), backend(), backend(), backend(hidden_slots=2)], 3),
]


def arrivals(replicas, rate, seconds, poisson, rng):
    """(time, replica) of every call, in time order."""
    if poisson:
        out, t = [], rng.expovariate(rate)
        while t <= seconds:
            out.append((t, rng.randrange(replicas)))
            t += rng.expovariate(rate)
        return out
    period = replicas / rate
    out = []
    for r in range(replicas):
        t = rng.random() * period
        while t <= seconds:
            out.append((t, r))
            t += period
    out.sort()
    return out


def simulate(policy, backends, replicas, rate, seconds, seed, poisson):
    rng = random.Random(seed)
    n = len(backends)
    finishing = [[] for _ in range(n)]  # finish times of running calls, per backend
    queues = [[] for _ in range(n)]  # (replica, arrival) waiting, FIFO
    in_flight = [[0] * n for _ in range(replicas)]
    events = []  # (finish time, backend, replica, arrival)
    latencies = []

    def start(b, replica, arrival, now):
        done = now + backends[b]["service"]
        heapq.heappush(finishing[b], done)
        heapq.heappush(events, (done, b, replica, arrival))

    def completion(b, now):
        """When a call sent to b now would finish (FIFO behind its queue)."""
        spec = backends[b]
        frees = sorted(finishing[b]) + [now] * (spec["slots"] - len(finishing[b]))
        heapq.heapify(frees)
        for _ in queues[b]:
            heapq.heappush(frees, max(heapq.heappop(frees), now) + spec["service"])
        return max(heapq.heappop(frees), now) + spec["service"]

    calls = arrivals(replicas, rate, seconds, poisson, rng)
    calls.append((float("inf"), 0))
    index = 0
    while True:
        next_arrival, replica = calls[index]
        if events and events[0][0] < next_arrival:
            now, b, replica, arrival = heapq.heappop(events)
            heapq.heappop(finishing[b])
            in_flight[replica][b] -= 1
            latencies.append(now - arrival)
            if queues[b]:
                r, a = queues[b].pop(0)
                start(b, r, a, now)
            continue
        now = next_arrival
        if now > seconds:
            break
        index += 1
        if policy == "least_request":
            pair = rng.sample(range(n), 2)
            b = min(pair, key=lambda k: (in_flight[replica][k], rng.random()))
        else:
            b = min(range(n), key=lambda k: (completion(k, now), rng.random()))
        in_flight[replica][b] += 1
        if len(finishing[b]) < backends[b]["slots"]:
            start(b, replica, now, now)
        else:
            queues[b].append((replica, now))
    latencies.sort()
    return latencies[int(0.99 * len(latencies))] * 1000.0


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    poisson = "--poisson" in sys.argv
    seconds = float(args[0]) if args else 60.0
    print("| scenario | load | least_request p99 ms | bound p99 ms | bound / least_request |")
    print("|---|---|---|---|---|")
    for sid, name, backends, replicas in SCENARIOS:
        capacity = sum(b["slots"] / b["service"] for b in backends)
        for load in (0.7, 0.9):
            rate = capacity * load
            lr = simulate("least_request", backends, replicas, rate, seconds, 1, poisson)
            best = simulate("bound", backends, replicas, rate, seconds, 1, poisson)
            print(f"| {sid}: {name} | {load:.0%} | {lr:.1f} | {best:.1f} | {best / lr:.2f} |")


if __name__ == "__main__":
    main()
