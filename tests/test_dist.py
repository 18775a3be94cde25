"""longctx.dist: the facts read from torchrun's environment, and `alone()` for rank 0's work after the others end."""

from longctx import dist
from longctx.data.workers import main_process_first


def test_environment_gives_rank_and_world(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.rank() == 1 and dist.world_size() == 2 and dist.is_distributed() and not dist.is_main()


def test_alone_is_one_process_whatever_torchrun_said(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with dist.alone():
        assert dist.world_size() == 1 and dist.is_main() and not dist.is_distributed()
        dist.barrier()  # a no-op: nothing to wait for
        with main_process_first():  # no accelerate state, no barrier
            pass
        assert dist.on_main(lambda: 3) == 3
    assert dist.world_size() == 2 and dist.is_distributed()  # restored
