"""The KV block pool on its own: borrow, return, refuse without taking anything."""

import pytest
import torch

from moeshare.errors import MoeshareError
from moeshare.memory.blocks import BlockPool, OutOfBlocks


def _pool(blocks: int = 4, block_size: int = 16) -> BlockPool:
    return BlockPool(blocks, block_size, 2, 2, 8, torch.float32, "cpu")


def test_blocks_are_lent_and_returned():
    pool = _pool()
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.used_blocks == 3 and pool.free_blocks == 1
    pool.free(a)
    assert pool.used_blocks == 0 and pool.free_blocks == 4


def test_asking_for_too_many_blocks_takes_none_and_says_so():
    pool = _pool()
    held = pool.allocate(2)
    with pytest.raises(OutOfBlocks, match="^asked for 3 KV blocks, 2 free$"):
        pool.allocate(3)
    assert pool.free_blocks == 2 and held


def test_blocks_for_rounds_tokens_up_to_whole_blocks():
    pool = _pool(block_size=16)
    assert [pool.blocks_for(n) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]


def test_the_pool_holds_a_scratch_block_beyond_those_it_lends():
    pool = _pool(blocks=4)
    assert pool.kv.shape == (5, 2, 2, 16, 2, 8)  # [N + 1, L, 2, B, Hkv, D]
    assert pool.scratch_block == 4 and 4 not in pool.allocate(4)
    assert BlockPool.block_bytes(16, 2, 2, 8, torch.float32) == pool.kv[0].numel() * 4


def test_a_pool_without_blocks_is_refused():
    with pytest.raises(MoeshareError, match="at least one block, got 0"):
        _pool(blocks=0)
