"""Output leases: one live holder, a lapsed lease is taken over, a lost lease stops its holder."""

import threading
import time

import pytest

from ossbatch.pipeline.lease import LeaseHeld, LeaseLost, acquire, current_holder, is_lease_file
from ossbatch.pipeline.storage import LOCAL, list_names


def _race(fs, work, contenders=6):
    won, refused = [], []
    barrier = threading.Barrier(contenders)

    def contend():
        barrier.wait()
        try:
            won.append(acquire(fs, work))
        except LeaseHeld as err:
            refused.append(str(err))

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_of_racing_runs_exactly_one_holds_the_output(tmp_path):
    fs, work = LOCAL.filesystem(str(tmp_path / "out"))
    won, refused = _race(fs, work)
    assert len(won) == 1 and len(refused) == 5
    assert "in use by another run" in refused[0] and "pid" in refused[0]
    assert current_holder(fs, work).token == won[0].holder.token


def test_of_racing_runs_on_s3_exactly_one_holds_the_output(s3):
    fs, work = LOCAL.filesystem(s3.uri("out"))
    won, refused = _race(fs, work, contenders=4)
    assert len(won) == 1 and len(refused) == 3


def test_a_released_or_lapsed_lease_is_taken_over(tmp_path):
    fs, work = LOCAL.filesystem(str(tmp_path / "out"))
    first = acquire(fs, work)
    first.release()
    second = acquire(fs, work, ttl=0.2)
    assert second.generation == first.generation + 1
    time.sleep(0.3)  # the holder was killed: it stopped renewing
    third = acquire(fs, work)
    assert third.generation == second.generation + 1
    # Only the live lease's file is left.
    assert [n for n in list_names(fs, work) if is_lease_file(n)] == ["_lease-000003.json"]
    with pytest.raises(LeaseLost, match="another run took the output over"):
        second.check()
    third.check()


def test_a_renewed_lease_outlives_its_ttl(tmp_path):
    fs, work = LOCAL.filesystem(str(tmp_path / "out"))
    with acquire(fs, work, ttl=0.4).keep_alive() as lease:
        time.sleep(0.8)
        with pytest.raises(LeaseHeld):
            acquire(fs, work)
        lease.check()
    assert current_holder(fs, work) is None


def test_a_lease_file_appears_whole_or_not_at_all(tmp_path):
    """Locally the file is written aside and linked into place: a racing run reading the newest
    lease never finds it empty (with O_EXCL it could, between create and write), and no file is left aside."""
    from ossbatch.pipeline.lease import _create_exclusive

    fs, work = LOCAL.filesystem(str(tmp_path / "out"))
    fs.makedirs(work, exist_ok=True)
    path = f"{work}/_lease-000001.json"
    assert _create_exclusive(fs, path, b'{"first": 1}') is True
    assert _create_exclusive(fs, path, b'{"second": 2}') is False
    assert fs.cat_file(path) == b'{"first": 1}'
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_lease-000001.json"]
