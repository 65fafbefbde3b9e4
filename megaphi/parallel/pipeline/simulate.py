"""Run the plans of all P ranks against each other without processes or tensors.

Communication is modelled at its strictest (rendezvous): a batch of sends and receives completes
only once every one of its operations has met its partner on the peer rank, in first-in-first-out
order per (sender, receiver, direction) channel (what NCCL and gloo guarantee for one pair). A set of
plans that finishes here cannot deadlock on a real backend, and every receive is checked to get
the tensor it names. With a cost per forward and backward the same run gives each rank's idle time:
the pipeline bubble of the schedule itself, communication taken as free.
"""

from .plan import Backward, Communicate, Forward


class PlanError(AssertionError):
    pass


def _ops(rank, size, comm):
    """(channel, label, is_send) for each operation of a Communicate; channel = (src, dst, direction)."""
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    ops = []
    if comm.send_next is not None:
        ops.append(((rank, nxt, "activation"), comm.send_next, True))
    if comm.send_prev is not None:
        ops.append(((rank, prv, "gradient"), comm.send_prev, True))
    if comm.recv_prev is not None:
        ops.append(((prv, rank, "activation"), comm.recv_prev, False))
    if comm.recv_next is not None:
        ops.append(((nxt, rank, "gradient"), comm.recv_next, False))
    return ops


def simulate(plans, num_microbatches, num_chunks=1, forward_cost=1.0, backward_cost=2.0, forward_only=False):
    """Execute plans[r] for every rank r. Returns {"time": per-rank finishing time, "busy": per-rank
    compute time}; raises PlanError on a deadlock, a mislabelled transfer, or a compute step whose
    input has not arrived."""
    size = len(plans)
    last_chunk = num_chunks - 1
    pc = [0] * size
    clock = [0.0] * size
    busy = [0.0] * size
    posted = [None] * size  # per rank: list of [op, done, completion time] of its current batch
    sends, recvs = {}, {}  # channel -> FIFO of (rank, op record)
    received_act = [set() for _ in range(size)]
    received_grad = [set() for _ in range(size)]
    produced_act = [set() for _ in range(size)]
    produced_grad = [set() for _ in range(size)]
    forwarded = [set() for _ in range(size)]
    backwarded = [set() for _ in range(size)]

    def pair(channel):
        s_queue, r_queue = sends.get(channel, []), recvs.get(channel, [])
        while s_queue and r_queue:
            (s_rank, s_rec), (r_rank, r_rec) = s_queue.pop(0), r_queue.pop(0)
            if s_rec[0][1] != r_rec[0][1]:
                raise PlanError(
                    f"channel {channel}: rank {s_rank} sent {s_rec[0][1]} but rank {r_rank} expected {r_rec[0][1]}"
                )
            when = max(s_rec[2], r_rec[2])
            s_rec[1] = r_rec[1] = True
            s_rec[2] = r_rec[2] = when

    progress = True
    while progress:
        progress = False
        for r in range(size):
            while pc[r] < len(plans[r]):
                step = plans[r][pc[r]]
                if isinstance(step, Communicate):
                    if posted[r] is None:
                        posted[r] = []
                        for op in _ops(r, size, step):
                            channel, label, is_send = op
                            if is_send:
                                produced = produced_act[r] if channel[2] == "activation" else produced_grad[r]
                                if label not in produced:
                                    raise PlanError(f"rank {r} sends {channel[2]} {label} before computing it")
                            record = [op, False, clock[r]]
                            posted[r].append(record)
                            (sends if is_send else recvs).setdefault(channel, []).append((r, record))
                            pair(channel)
                    if not all(rec[1] for rec in posted[r]):
                        break
                    for (channel, label, is_send), _, when in posted[r]:
                        clock[r] = max(clock[r], when)
                        if not is_send:
                            (received_act[r] if channel[2] == "activation" else received_grad[r]).add(label)
                    posted[r] = None
                elif isinstance(step, Forward):
                    key = (step.chunk, step.microbatch)
                    if not (r == 0 and step.chunk == 0) and key not in received_act[r]:
                        raise PlanError(f"rank {r} runs forward {key} before its input arrived")
                    forwarded[r].add(key)
                    clock[r] += forward_cost
                    busy[r] += forward_cost
                    if not (r == size - 1 and step.chunk == last_chunk):
                        produced_act[r].add((step.chunk + 1 if r == size - 1 else step.chunk, step.microbatch))
                elif isinstance(step, Backward):
                    key = (step.chunk, step.microbatch)
                    if key not in forwarded[r]:
                        raise PlanError(f"rank {r} runs backward {key} before its forward")
                    if not (r == size - 1 and step.chunk == last_chunk) and key not in received_grad[r]:
                        raise PlanError(f"rank {r} runs backward {key} before its output gradient arrived")
                    backwarded[r].add(key)
                    clock[r] += backward_cost
                    busy[r] += backward_cost
                    if not (r == 0 and step.chunk == 0):
                        produced_grad[r].add((step.chunk - 1 if r == 0 else step.chunk, step.microbatch))
                pc[r] += 1
                progress = True
    stuck = [r for r in range(size) if pc[r] < len(plans[r])]
    if stuck:
        raise PlanError(f"deadlock: ranks {stuck} wait at steps {[pc[r] for r in stuck]}")
    everything = {(c, j) for c in range(num_chunks) for j in range(num_microbatches)}
    for r in range(size):
        if forwarded[r] != everything or (not forward_only and backwarded[r] != everything):
            raise PlanError(f"rank {r} did not run every forward and backward exactly once")
    return {"time": clock, "busy": busy}


def bubble_fraction(result):
    """Idle share of the step: 1 - (compute time) / (ranks x step time)."""
    step = max(result["time"])
    return 1.0 - sum(result["busy"]) / (len(result["busy"]) * step)
