"""The scheduler on its own (CPU, real block pool and residency): prefill, decode, preemption, caps."""

import torch

from moeshare.engine.request import SamplingParams, Sequence, Status
from moeshare.engine.residency import Residency
from moeshare.engine.scheduler import Scheduled, Scheduler
from moeshare.memory.blocks import BlockPool

VARIANTS = ["a", "b"]


def _scheduler(blocks: int = 8, block_size: int = 4, rows: int = 2, **kw) -> Scheduler:
    pool = BlockPool(blocks, block_size, 1, 1, 2, torch.float32, "cpu")

    def fetch(v: str) -> tuple[dict, torch.Tensor]:
        return {}, torch.zeros(1, 1, dtype=torch.int64)

    residency = Residency(rows, VARIANTS, fetch, lambda *a: None, torch.device("cpu"))
    return Scheduler(pool, residency, kw.get("max_num_seqs", 8), kw.get("max_batched_tokens", 64))


def _seq(model: str, prompt: int, arrival: float = 0.0) -> Sequence:
    return Sequence(model, list(range(1, prompt + 1)), SamplingParams(), arrival=arrival)


def _ran(batch: list[Scheduled]) -> None:
    """What the instance does after a step: the computed tokens are cached, one new token each."""
    for s in batch:
        s.seq.num_cached = s.start + s.count
        s.seq.output_ids.append(7)


def test_a_prompt_is_prefilled_then_decoded_one_token_at_a_time():
    sched = _scheduler()
    seq = _seq("a", 5)
    sched.add(seq)
    (first,) = sched.schedule()
    assert (first.start, first.count, first.row) == (0, 5, 0) and seq.status is Status.RUNNING
    assert len(seq.block_table) == 2  # 5 tokens in blocks of 4
    _ran([first])
    (second,) = sched.schedule()
    assert (second.start, second.count) == (5, 1)


def test_decodes_run_before_new_prefills_and_within_the_token_budget():
    sched = _scheduler(max_batched_tokens=8)
    old = _seq("a", 3)
    sched.add(old)
    _ran(sched.schedule())
    big, small = _seq("b", 10), _seq("a", 2)
    sched.add(big)
    sched.add(small)
    batch = sched.schedule()
    assert batch[0].seq is old and batch[0].count == 1
    assert [s.seq for s in batch[1:]] == []  # the 10-token prefill does not fit beside the decode: it waits
    assert list(sched.waiting) == [big, small]


def test_when_blocks_run_out_the_newest_sequence_is_preempted_and_its_blocks_freed():
    sched = _scheduler(blocks=3, block_size=4)
    first, second = _seq("a", 4, arrival=1.0), _seq("b", 4, arrival=2.0)
    sched.add(first)
    sched.add(second)
    _ran(sched.schedule())  # one block each; the next token of each needs a second block
    assert sched.pool.free_blocks == 1
    batch = sched.schedule()
    assert [s.seq for s in batch] == [first] and len(first.block_table) == 2
    assert second.status is Status.WAITING and second.block_table == [] and second.num_cached == 0
    assert sched.waiting[0] is second and sched.preemptions == 1 and second.preemptions == 1


def test_release_returns_blocks_and_forgets_the_sequence():
    sched = _scheduler()
    seq = _seq("a", 9)
    sched.add(seq)
    sched.schedule()
    assert sched.pool.used_blocks == 3
    sched.release(seq)
    assert sched.pool.used_blocks == 0 and not sched.running and not sched.waiting


def test_no_more_than_max_num_seqs_run_at_once():
    sched = _scheduler(max_num_seqs=2)
    for _ in range(3):
        sched.add(_seq("a", 2))
    assert len(sched.schedule()) == 2 and len(sched.running) == 2 and len(sched.waiting) == 1


def test_a_variant_whose_row_is_busy_waits_while_others_run():
    sched = _scheduler(rows=1)
    a, b = _seq("a", 2), _seq("b", 2)
    sched.add(a)
    _ran(sched.schedule())
    sched.add(b)
    batch = sched.schedule()
    assert [s.seq for s in batch] == [a] and list(sched.waiting) == [b]
    assert sched.busy_rows() == {0}


def test_a_sequence_preempted_after_it_was_scheduled_leaves_the_batch():
    # admitted first but newer by arrival: when the older one needs its block, the newer is the victim,
    # after the decode loop had already put it in this step's batch
    sched = _scheduler(blocks=3, block_size=4)
    newer, older = _seq("a", 3, arrival=2.0), _seq("b", 4, arrival=1.0)
    sched.add(newer)
    _ran(sched.schedule())
    sched.add(older)
    _ran(sched.schedule())
    batch = sched.schedule()
    assert newer not in [s.seq for s in batch] and not newer.block_table and newer in sched.waiting
    assert all(s.seq.block_table for s in batch)


def test_a_row_whose_pending_token_may_end_it_preempts_nobody():
    # a's pending token may be its stop token: when its next row needs a block the pool lacks, it waits for
    # the read-back instead of preempting b (whose whole prefix would be recomputed for a dropped row)
    sched = _scheduler(blocks=4, block_size=4)
    a, b = _seq("a", 7, arrival=0.0), _seq("b", 8, arrival=1.0)
    sched.add(a)
    sched.add(b)
    assert [s.seq for s in sched.schedule()] == [a, b]  # a: 2 blocks, b: 2 blocks, the pool is full
    a.pending = b.pending = 1  # both steps queued, tokens not read back
    # a's next token is its 8th (fits its 2 blocks); b's is its 9th (needs a 3rd block)
    batch = sched.schedule()
    assert [s.seq for s in batch] == [a] and b.status is Status.RUNNING and sched.preemptions == 0
    a.pending, b.pending = 1, 0  # b's token is read back: now it preempts as before (b is the newest)
    b.output_ids.append(7)
    assert [s.seq for s in sched.schedule()] == [a] and b.status is Status.WAITING and sched.preemptions == 1
