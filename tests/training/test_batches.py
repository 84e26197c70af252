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


@pytest.mark.parametrize("window", [1, 64])
def test_rows_of_one_positive_never_meet_in_a_batch(window):
    """Retrieval rows sharing a positive passage: in one batch each was the other's in-batch negative (trained
    against its own target). Kept apart in every epoch, every row still once an epoch, the short batch last, the
    same batches for the same seed and epoch; a key on more rows than there are batches is kept apart as far as
    the batches go."""
    rows, batch_size = 61, 8
    keys = [i // 3 for i in range(rows)]  # every passage the positive of three rows, next to each other
    keys[-8:] = ["crowd"] * 8  # one passage the positive of 8 rows: 8 batches, one each
    lengths = [(i * 7) % 11 + 1 for i in range(rows)]
    sampler = LengthGroupedBatches(lengths, batch_size, seed=1, window=window, apart=keys)
    plain = LengthGroupedBatches(lengths, batch_size, seed=1, window=window)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        batches = sampler.batches()
        assert batches == sampler.batches()
        assert sorted(i for batch in batches for i in batch) == list(range(rows))
        assert [len(b) for b in batches] == [len(b) for b in plain.batches()]
        for batch in batches:
            assert len({keys[i] for i in batch}) == len(batch), (epoch, batch)
    assert any(
        len({keys[i] for i in batch}) < len(batch)
        for epoch in range(5)
        for batch in (plain.set_epoch(epoch), plain.batches())[1]
    )  # without it, some batch holds two rows of one passage
