"""What ``reflq rerun`` calls bit-identical (``reflservd.rerun.compare``), on
jobs held in memory; the real rerun is in test_provenance_e2e.py."""

import os

from reflservd.rerun import VARYING_FILES, compare

RESULT = {"fitter": "lm", "seed": 5, "steps": 9, "chisq": 1.0123456789,
          "parameters": {"Ni thickness": {"value": 100.12345678901234, "uncertainty": 0.25}}}


class StoredJob:
    """A finished job's result and files, as `reflservd.client.Job` shows them."""

    def __init__(self, jobId, result, files):
        self.id, self.result, self.contents = jobId, result, files

    def files(self):
        return [{"name": name, "size": len(data), "kind": "result"} for name, data in self.contents.items()]

    def download(self, directory, names=None):
        os.makedirs(directory, exist_ok=True)
        for name in names:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(self.contents[name])


def test_identical_means_the_same_numbers_and_the_same_bytes_but_session_and_logs(tmp_path):
    """The session file and the fit's output differ between any two runs and are
    not compared; every other file's bytes and the result's numbers are."""
    files = {"nifilm.par": b"Ni thickness 100.12345678901234\n", "nifilm-1-refl.dat": b"0.01 1.0\n"}
    old = StoredJob(1, RESULT, dict(files, **{name: b"run 1" for name in VARYING_FILES}))
    new = StoredJob(2, dict(RESULT), dict(files, **{name: b"run 2" for name in VARYING_FILES}))
    assert compare(old, new, str(tmp_path / "a")) == (True, [], sorted(files))


def test_a_last_digit_or_a_byte_differs(tmp_path):
    files = {"nifilm.par": b"Ni thickness 100.1\n", "plot.png": b"\x89PNG..."}
    moved = dict(RESULT, parameters={"Ni thickness": {"value": 100.12345678901235, "uncertainty": 0.25}})
    old = StoredJob(1, RESULT, files)
    new = StoredJob(2, moved, dict(files, **{"plot.png": b"\x89PNG,,,", "extra.dat": b""}))
    identical, differences, compared = compare(old, new, str(tmp_path / "b"))
    assert not identical and compared == ["nifilm.par", "plot.png"]
    assert differences[0].startswith("result parameters:")
    assert "result file extra.dat: only in job 2" in differences
    assert "result file plot.png: other bytes" in differences


def test_serialized_models_are_compared_but_for_their_random_parameter_ids(tmp_path):
    """bumps draws a uuid for every parameter each time it loads a model: the
    ids are renumbered by first appearance; any other change is a difference."""
    first = b'{"a": {"id": "481e", "v": 1.5}, "b": {"id": "ecc0"}, "c": {"id": "481e"}}'
    second = b'{"a": {"id": "8c25", "v": 1.5}, "b": {"id": "306c"}, "c": {"id": "8c25"}}'
    crossed = b'{"a": {"id": "8c25", "v": 1.5}, "b": {"id": "306c"}, "c": {"id": "306c"}}'
    old = StoredJob(1, RESULT, {"nifilm.json": first})
    assert compare(old, StoredJob(2, RESULT, {"nifilm.json": second}), str(tmp_path / "a"))[0]
    assert not compare(old, StoredJob(3, RESULT, {"nifilm.json": crossed}), str(tmp_path / "b"))[0]
