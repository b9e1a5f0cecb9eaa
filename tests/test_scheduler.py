"""The scheduler on its own (CPU, real block pool and residency): prefill, decode, preemption, caps."""

import torch

from moeshare.engine.request import SamplingParams, Sequence, Status, Targets
from moeshare.engine.residency import Residency
from moeshare.engine.scheduler import Scheduled, Scheduler
from moeshare.memory.blocks import BlockPool

VARIANTS = ["a", "b"]


def _scheduler(blocks: int = 8, block_size: int = 4, rows: int = 2, **kw) -> Scheduler:
    pool = BlockPool(blocks, block_size, 1, 1, 2, torch.float32, "cpu")

    def fetch(v: str) -> tuple[dict, torch.Tensor]:
        return {}, torch.zeros(1, 1, dtype=torch.int64)

    residency = Residency(rows, VARIANTS, fetch, lambda *a: None, torch.device("cpu"))
    return Scheduler(
        pool,
        residency,
        kw.get("max_num_seqs", 8),
        kw.get("max_batched_tokens", 64),
        chunked_prefill=kw.get("chunked_prefill", True),
    )


def _seq(model: str, prompt: int, arrival: float = 0.0) -> Sequence:
    return Sequence(model, list(range(1, prompt + 1)), SamplingParams(), arrival=arrival)


def _ran(batch: list[Scheduled]) -> None:
    """What the instance does after a step: the computed tokens are cached, one new token each (none for a
    chunk short of its prompt's end)."""
    for s in batch:
        s.seq.num_cached = s.start + s.count
        if s.samples:
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


def test_without_chunking_decodes_run_before_new_prefills_and_a_whole_prompt_waits_for_the_budget():
    sched = _scheduler(max_batched_tokens=8, chunked_prefill=False)
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
    # the first step's tokens are read back (a's second row stays queued): b now preempts as before (b is the
    # newest)
    a.pending, b.pending = 1, 0
    a.output_ids.append(7)
    b.output_ids.append(7)
    # a's next row needs a third block too, but its pending token may still end it: it waits; b preempts itself
    assert sched.schedule() == [] and b.status is Status.WAITING and sched.preemptions == 1
    a.pending = 0  # a's second token is read back: it takes the blocks b gave back
    a.output_ids.append(7)
    assert [s.seq for s in sched.schedule()] == [a] and len(a.block_table) == 3


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_decodes_which_advance_every_step():
    sched = _scheduler(blocks=16, max_batched_tokens=4)
    old = _seq("a", 3)
    sched.add(old)
    _ran(sched.schedule())
    long = _seq("b", 10)
    sched.add(long)
    chunks = []
    for _ in range(4):
        batch = sched.schedule()
        assert batch[0].seq is old and (batch[0].count, batch[0].samples) == (1, True)  # never starved
        assert sum(s.count for s in batch) <= 4
        chunks += [(s.start, s.count, s.samples) for s in batch[1:]]
        _ran(batch)
    # 3 tokens of budget beside the decode each step: 0-2, 3-5, 6-8, then the last one draws the first token
    assert chunks == [(0, 3, False), (3, 3, False), (6, 3, False), (9, 1, True)]
    assert long.output_ids == [7] and long.num_cached == 10 and len(long.block_table) == 3
    (decode,) = [s for s in sched.schedule() if s.seq is long]
    assert (decode.start, decode.count, decode.samples) == (10, 1, True)


def test_a_prompt_being_prefilled_can_be_preempted_and_starts_over():
    sched = _scheduler(blocks=3, block_size=4, max_batched_tokens=4)
    first, second = _seq("a", 4, arrival=1.0), _seq("b", 9, arrival=2.0)
    sched.add(first)
    sched.add(second)
    _ran(sched.schedule())  # first's whole prompt (4 tokens): second waits for budget
    _ran(sched.schedule())  # first decodes (its second block), second's first chunk (3 tokens, one block)
    assert second.num_cached == 3 and second.status is Status.RUNNING
    # second's next chunk needs a second block and none is left: it is the newest, so it gives its block back
    # and starts over with the budget first leaves
    batch = sched.schedule()
    assert [(s.seq, s.start, s.count) for s in batch] == [(first, 5, 1), (second, 0, 3)]
    assert sched.preemptions == second.preemptions == 1 and len(first.block_table) == 2


def test_a_higher_priority_prompt_is_admitted_first_and_a_lower_priority_one_preempted_first():
    sched = _scheduler(max_batched_tokens=4, chunked_prefill=False)
    low = Sequence("a", [1, 2, 3, 4], SamplingParams(), arrival=1.0)
    high = Sequence("b", [1, 2, 3, 4], SamplingParams(), arrival=2.0, targets=Targets(priority=1))
    sched.add(low)
    sched.add(high)
    assert [s.seq for s in sched.schedule()] == [high]  # room for one prompt: the later, higher one
    # short of blocks, the older but lower-priority sequence is the one preempted
    sched = _scheduler(blocks=3, block_size=4, max_batched_tokens=8)
    low = Sequence("a", [1, 2, 3, 4], SamplingParams(), arrival=1.0)
    high = Sequence("b", [1, 2, 3, 4], SamplingParams(), arrival=2.0, targets=Targets(priority=1))
    sched.add(low)
    sched.add(high)
    _ran(sched.schedule())  # one block each, one free; each next token needs a second block
    assert [s.seq for s in sched.schedule()] == [high]
    assert low.status is Status.WAITING and sched.preemptions == 1 and len(high.block_table) == 2
