"""The training batches as several processes see them."""

import pytest
from accelerate.data_loader import BatchSamplerShard

from finetune.training.loop import LengthGroupedBatches


@pytest.mark.parametrize("rows,batch_size,processes", [(28, 8, 2), (29, 4, 3), (17, 8, 2), (8, 8, 2), (3, 8, 2)])
@pytest.mark.parametrize("window", [1, 64])
def test_every_process_gets_len_batches_in_every_epoch(rows, batch_size, processes, window):
    """accelerate deals the batches out to processes in turn and evens them out by the last one only: the short
    batch must come last, or a process gets fewer batches than len(loader) and its epoch never ends (a run of
    several processes spun forever in its second epoch). Every row is still trained on once an epoch."""
    lengths = [(i * 7) % 11 + 1 for i in range(rows)]
    sampler = LengthGroupedBatches(lengths, batch_size, seed=0, window=window)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        batches = sampler.batches()
        assert sorted(i for batch in batches for i in batch) == list(range(rows))
        assert all(len(batch) == batch_size for batch in batches[:-1])
        for rank in range(processes):
            shard = BatchSamplerShard(sampler, processes, rank, split_batches=False, even_batches=True)
            assert len(list(shard)) == len(shard), (epoch, rank)
