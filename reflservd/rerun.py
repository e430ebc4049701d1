"""``reflq rerun ID``: run a finished fit again from the inputs the server
kept, with its seed and options, and say whether the new result is
bit-identical to the old (docs/client.md, "Provenance and reruns").

What is compared: the result's fitted values, uncertainties and χ² (as
numbers, exactly), its fitter, seed and steps, and the bytes of every result
file but those a fit writes differently on every run: ``VARYING_FILES`` (the
session file, which stores the times of its history and ids drawn at random,
and the fit's output, which ends with the fit's time). The serialized models
(``*.json``: MODEL.json, MODEL-N-expt.json) hold parameter ids that bumps
draws at random (uuid4) each time it loads a model, as keys and values: they
are compared with each uuid renumbered by its first appearance, every other
byte as is.
Two runs of the same seeded nickel LM fit agreed this way on every file
(2026-12-08, refl1d 1.0.1, bumps 1.0.4). The rerun is submitted with
``"cache": false``, so that it really runs.
"""

import os
import re
import tempfile

from reflservd.client import ClientError, listedName

VARYING_FILES = ("session.h5", "stdout.txt", "stderr.txt")
"""Result files whose bytes differ between two runs of the same seeded fit."""
RESULT_FIELDS = ("fitter", "seed", "steps", "chisq", "parameters")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def rerun(client, jobId, directory=None):
    """Submit job ``jobId``'s inputs again with its seed and options, without
    the cache; the new `Job` (not waited for)."""
    old = client.job(jobId)
    record = old.record
    request = record.get("request") or {}
    data = request.get("data")
    if record.get("status") != "COMPLETE" or not isinstance(record.get("result"), dict):
        raise ClientError("job %d is %s: only a COMPLETE fit can be rerun" % (old.id, record.get("status")))
    if request.get("service", "refl1d") != "refl1d" or not isinstance(data, dict):
        raise ClientError("job %d is not a refl1d fit" % (old.id,))
    directory = directory or tempfile.mkdtemp(prefix="reflq-rerun-%d-" % (old.id,))
    paths = {}
    for entry in old.files(kind="upload"):
        path = os.path.join(directory, listedName(entry["name"]))
        with open(path, "wb") as f:
            f.write(old.read(entry["name"], kind="upload"))
        paths[entry["name"]] = path
    model = data.get("model")
    if model not in paths:
        raise ClientError("job %d's model %r is not among its files" % (old.id, model))
    options = dict(data.get("options") or {})
    options["seed"] = record["result"].get("seed") or options.get("seed")
    return client.submit(paths[model], data=[p for n, p in sorted(paths.items()) if n != model],
                         name=record.get("name"), queue=request.get("queue"), cache=False, **options)


def compare(old, new, directory):
    """``(identical, differences, compared)``: whether job ``new``'s result is
    bit-identical to ``old``'s by the rule above, what differs, and the result
    files whose bytes were compared. Downloads both jobs' files into ``directory``."""
    differences = []
    oldResult, newResult = old.result or {}, new.result or {}
    for name in RESULT_FIELDS:
        if oldResult.get(name) != newResult.get(name):
            differences.append("result %s: %r, now %r" % (name, oldResult.get(name), newResult.get(name)))
    oldFiles = {f["name"] for f in old.files()} - set(VARYING_FILES)
    newFiles = {f["name"] for f in new.files()} - set(VARYING_FILES)
    for name in sorted(oldFiles ^ newFiles):
        differences.append("result file %s: only in job %d" % (name, old.id if name in oldFiles else new.id))
    compared = sorted(oldFiles & newFiles)
    oldDir, newDir = os.path.join(directory, str(old.id)), os.path.join(directory, str(new.id))
    old.download(oldDir, names=compared)
    new.download(newDir, names=compared)
    for name in compared:
        same = _sameJSON if name.endswith(".json") else _sameBytes
        if not same(os.path.join(oldDir, name), os.path.join(newDir, name)):
            differences.append("result file %s: other bytes" % (name,))
    return not differences, differences, compared


def _sameJSON(a, b):
    """Whether two serialized models are the same bytes but for their random ids."""
    with open(a, "rb") as f, open(b, "rb") as g:
        return _renumbered(f.read()) == _renumbered(g.read())


def _renumbered(text):
    """``text`` with each uuid (bumps' parameter ids, as keys and values) replaced
    by the order of its first appearance."""
    ids = {}
    return _UUID.sub(lambda match: b"#%d" % (ids.setdefault(match.group(0), len(ids)),), text)


def _sameBytes(a, b):
    with open(a, "rb") as f, open(b, "rb") as g:
        while True:
            x, y = f.read(1 << 20), g.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
