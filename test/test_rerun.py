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
    x, y = "481ec714-f9a8-4525-9502-bc7b1420f2ba", "ecc06a60-e761-4fbc-8be9-122c6027db01"
    u, v = "8c25ad5c-7979-4ae1-9ee2-39705ed41426", "306c8d66-c5e4-4bf5-8a2f-4947d6577e92"
    model = '{"a": {"id": "%s", "v": 1.5}, "b": {"id": "%s"}, "references": {"%s": {"id": "%s"}}}'
    first = (model % (x, y, x, x)).encode()
    second = (model % (u, v, u, u)).encode()
    crossed = (model % (u, v, v, v)).encode()
    old = StoredJob(1, RESULT, {"nifilm.json": first})
    assert compare(old, StoredJob(2, RESULT, {"nifilm.json": second}), str(tmp_path / "a"))[0]
    assert not compare(old, StoredJob(3, RESULT, {"nifilm.json": crossed}), str(tmp_path / "b"))[0]
